"""Following VideoRoom rooms from Janus events: a pure state machine, no I/O.

A room's *meetings* are disjoint spans of Janus time (the events' ``timestamp``, µs). Every event
is placed by its timestamp, not by when it arrived, so duplicates, reordering and a replay after
a restart of the service change nothing already decided:

* an event at or before the end of an ended meeting belongs to it, and is ignored (late);
* ``created``, ``joined`` or ``published`` after the last meeting ended opens a new one (Janus
  reuses room numbers); a late ``leaving`` after the end opens nothing (a closed connection's
  ``leaving`` comes only when its session times out, long after its ``unpublished``);
* ``destroyed`` ends the meeting at once: a room destroyed while people publish sends no
  ``leaving``;
* a participant is gone at its latest ``unpublished``/``leaving`` unless it joined or
  published again after; when every participant of an open meeting is gone, a grace deadline
  (wall clock, so it survives restarts when stored) is set, cleared if someone comes back, and
  the meeting ends when it passes (:func:`Room.tick`).

A meeting ends once; that transition is what enqueues its render, so it happens once.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

STARTING = frozenset({"created", "joined", "published"})
DEPARTING = frozenset({"unpublished", "leaving", "kicked"})
KINDS = STARTING | DEPARTING | {"destroyed"}
VIDEOROOM = "janus.plugin.videoroom"
PLUGIN_EVENT = 64
MAX_MEETINGS = 20


@dataclass(frozen=True)
class RoomEvent:
    """One VideoRoom event that matters here."""

    room: str
    kind: str
    ts: int  # Janus's timestamp, µs since the epoch
    publisher: str | None = None


#: A room or publisher id given as a string (Janus's ``string_ids``): it becomes part of Redis
#: keys and of output file names, so no path separators, no leading dot, and a bounded length.
STRING_ID = re.compile(r"\w[\w.:@+=-]{0,127}", re.ASCII)
ID_LIMIT = 2**64  # Janus's numeric ids are guint64
TS_LIMIT = 2**63  # µs; anything above is no date a datetime can hold


def _identifier(value: Any) -> str | None:
    """The id as a string, or None when Janus could not have sent it."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < ID_LIMIT:
        return str(value)
    if isinstance(value, str) and STRING_ID.fullmatch(value):
        return value
    return None


def parse_events(payload: Any, now: float | None = None, skew: float = 86400.0,
                 dropped: dict[str, int] | None = None) -> list[RoomEvent]:
    """The VideoRoom events in what the sample event handler POSTs (one event or a list).

    Events every room follows are checked here, once: a room id that is not a 64-bit number or
    a short plain string, a publisher id of neither kind, or a timestamp further than ``skew``
    seconds from ``now`` (when given) drops the event, counted in ``dropped`` by reason. A
    timestamp far in the future would otherwise end a room's meeting there and make every
    later event of the room "late"."""
    items = payload if isinstance(payload, list) else [payload]
    out = []

    def drop(reason: str) -> None:
        if dropped is not None:
            dropped[reason] = dropped.get(reason, 0) + 1

    for item in items:
        if not isinstance(item, dict) or item.get("type") != PLUGIN_EVENT:
            continue
        event = item.get("event")
        if not isinstance(event, dict) or event.get("plugin") != VIDEOROOM:
            continue
        data = event.get("data")
        if not isinstance(data, dict) or data.get("event") not in KINDS:
            continue
        room, ts = _identifier(data.get("room")), item.get("timestamp")
        if room is None:
            drop("room")
            continue
        if (not isinstance(ts, int) or isinstance(ts, bool) or not 0 < ts < TS_LIMIT
                or (now is not None and abs(ts / 1e6 - now) > skew)):
            drop("timestamp")
            continue
        who = data.get("id")
        publisher = None if who is None else _identifier(who)
        if who is not None and publisher is None:
            drop("publisher")
            continue
        out.append(RoomEvent(room, str(data["event"]), ts, publisher))
    return out


@dataclass
class Publisher:
    """Latest time (µs) of each thing a participant did."""

    joined: int | None = None
    published: int | None = None
    gone: int | None = None

    @property
    def present(self) -> bool:
        """Joined or published since it last went (one who joined may publish yet)."""
        came = max((t for t in (self.joined, self.published) if t is not None), default=None)
        return came is not None and (self.gone is None or came > self.gone)


def _later(old: int | None, new: int) -> int:
    return new if old is None else max(old, new)


@dataclass
class MeetingSpan:
    id: str  # "<room>-<µs of the first event seen>": stable once made
    room: str
    first: int
    last: int
    publishers: dict[str, Publisher] = field(default_factory=dict)
    end: int | None = None
    ended_by: str | None = None  # "destroyed" or "empty"
    deadline: float | None = None  # wall clock, while every publisher is gone
    render: dict[str, Any] | None = None  # {"state": pending|submitted|skipped, ...}
    #: The latest prerender while the meeting goes on: {"job": id, "at": wall clock, "n": count}
    prerender: dict[str, Any] | None = None

    @property
    def open(self) -> bool:
        return self.end is None

    @property
    def empty(self) -> bool:
        return bool(self.publishers) and not any(p.present for p in self.publishers.values())

    def close(self, end: int, why: str, not_before: float) -> None:
        """End the meeting; its render is due from ``not_before`` (wall clock), once Janus
        has closed the recordings."""
        self.end = end
        self.ended_by = why
        self.deadline = None
        self.render = {"state": "pending", "not_before": not_before}

    def note(self, event: RoomEvent) -> None:
        self.first = min(self.first, event.ts)
        self.last = max(self.last, event.ts)
        if event.publisher is None:
            return
        who = self.publishers.setdefault(event.publisher, Publisher())
        if event.kind == "joined":
            who.joined = _later(who.joined, event.ts)
        elif event.kind == "published":
            who.published = _later(who.published, event.ts)
        elif event.kind in DEPARTING:
            who.gone = _later(who.gone, event.ts)


@dataclass
class Room:
    room: str
    meetings: list[MeetingSpan] = field(default_factory=list)

    # -- persistence -------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Room:
        data = json.loads(text)
        meetings = []
        for m in data["meetings"]:
            m["publishers"] = {k: Publisher(**v) for k, v in m["publishers"].items()}
            meetings.append(MeetingSpan(**m))
        return cls(data["room"], meetings)

    # -- queries -----------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        found = [m.deadline for m in self.meetings if m.open and m.deadline is not None]
        return min(found) if found else None

    def worth_keeping(self) -> bool:
        """Whether forgetting the room could lose or repeat a render: someone publishes in an
        open meeting, or a render is pending or submitted (a late event must find it ended).
        Other rooms (created and never used, or whose meetings had nothing to render) are
        cheap to forget, and are kept only briefly."""
        return any(
            (m.open and m.publishers)
            or (m.render or {}).get("state") in ("pending", "submitted")
            for m in self.meetings)

    def live(self) -> list[MeetingSpan]:
        """Open meetings someone has published or joined in: their recordings grow."""
        return [m for m in self.meetings if m.open and m.publishers]

    def pending(self) -> list[MeetingSpan]:
        return [m for m in self.meetings if m.render and m.render.get("state") == "pending"]

    def meeting(self, meeting_id: str) -> MeetingSpan | None:
        return next((m for m in self.meetings if m.id == meeting_id), None)

    def neighbours(self, meeting: MeetingSpan) -> tuple[MeetingSpan | None, MeetingSpan | None]:
        """The meetings just before and after ``meeting`` in time."""
        k = self.meetings.index(meeting)
        before = self.meetings[k - 1] if k > 0 else None
        after = self.meetings[k + 1] if k + 1 < len(self.meetings) else None
        return before, after

    # -- transitions -------------------------------------------------------------------------
    def _place(self, ts: int) -> MeetingSpan | None:
        previous_end: int | None = None
        for meeting in self.meetings:
            after_previous = previous_end is None or ts > previous_end
            if meeting.end is None:
                return meeting if after_previous else None
            if ts <= meeting.end and after_previous:
                return meeting
            previous_end = meeting.end
        return None

    def apply(self, event: RoomEvent, now: float, grace: float,
              settle: float = 0.0) -> list[MeetingSpan]:
        """Take one event; the meetings it ended (their render is due ``settle`` seconds
        later)."""
        meeting = self._place(event.ts)
        if meeting is None:
            if event.kind in STARTING or not self.meetings:
                meeting = MeetingSpan(f"{self.room}-{event.ts}", self.room, event.ts, event.ts)
                self.meetings.append(meeting)
                self._trim()
            else:
                return []  # after the end of the last meeting, and starts nothing
        if not meeting.open:
            meeting.first = min(meeting.first, event.ts)
            return []  # late or repeated
        if event.kind == "destroyed":
            if event.ts < meeting.first and len(meeting.publishers) > 0:
                return []  # an earlier meeting's end, never seen
            meeting.note(event)
            meeting.close(event.ts, "destroyed", now + settle)
            return [meeting]
        meeting.note(event)
        if meeting.empty:
            if meeting.deadline is None:
                meeting.deadline = now + grace
        else:
            meeting.deadline = None
        return []

    def tick(self, now: float, settle: float = 0.0) -> list[MeetingSpan]:
        """End the meetings whose grace period passed with nobody publishing."""
        ended = []
        for meeting in self.meetings:
            if meeting.open and meeting.deadline is not None and meeting.deadline <= now:
                if meeting.empty:
                    meeting.close(meeting.last, "empty", now + settle)
                    ended.append(meeting)
                else:
                    meeting.deadline = None
        return ended

    def _trim(self) -> None:
        self.meetings.sort(key=lambda m: m.first)
        while len(self.meetings) > MAX_MEETINGS:
            oldest = self.meetings[0]
            if oldest.open or (oldest.render or {}).get("state") == "pending":
                break
            self.meetings.pop(0)
