"""The room tracker's state machine against the events real Janus sent (no Redis, no clock).

Each fixture's ``events.jsonl`` is what Janus's sample event handler posted during the meeting.
Whatever the order, repetition, or a pause longer than the grace period in the middle (a
service restart), each room's meeting ends exactly once.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from melter.serve.rooms import Room, RoomEvent, parse_events

FIXTURES = Path(__file__).parent.parent / "fixtures"
MEETINGS = ["dev-three-party-vp8", "dev-two-party-h264", "dev-turn-taking-vp8"]
GRACE = 5.0


def events_of(name: str) -> list[RoomEvent]:
    out: list[RoomEvent] = []
    for line in (FIXTURES / name / "events.jsonl").read_text().splitlines():
        out += parse_events(json.loads(line))
    return out


def run(events: list[RoomEvent], now: float = 0.0) -> tuple[Room, list[str]]:
    room = Room(events[0].room)
    ended = [m.id for e in events for m in room.apply(e, now, GRACE)]
    return room, ended


def test_the_fixtures_hold_the_real_sequences() -> None:
    kinds = {name: [e.kind for e in events_of(name)] for name in MEETINGS}
    for name, seen in kinds.items():
        assert seen.count("destroyed") == 1 and seen[-1] == "destroyed", name
    # three-party: X and Z still publish when the room is destroyed: no leaving for them
    three = events_of("dev-three-party-vp8")
    assert [(e.kind, e.publisher) for e in three if e.kind in ("leaving", "unpublished")] == [
        ("unpublished", "502"), ("unpublished", "502"), ("leaving", "502")]
    # two-party: Y (512) closed its connection: unpublished 2 s before its leaving
    two = events_of("dev-two-party-h264")
    unpublished = min(e.ts for e in two if e.kind == "unpublished" and e.publisher == "512")
    leaving = min(e.ts for e in two if e.kind == "leaving" and e.publisher == "512")
    assert leaving - unpublished > 1_000_000


@pytest.mark.parametrize("name", MEETINGS)
def test_in_order_one_meeting_ended_by_destroy(name: str) -> None:
    events = events_of(name)
    room, ended = run(events)
    assert len(ended) == 1 and len(room.meetings) == 1
    meeting = room.meetings[0]
    assert meeting.ended_by == "destroyed"
    assert meeting.end == max(e.ts for e in events)
    assert meeting.first == min(e.ts for e in events)
    assert meeting.render == {"state": "pending", "not_before": 0.0}
    # a JSON round trip (what Redis holds) keeps everything
    assert Room.from_json(room.to_json()) == room


def test_destroyed_while_publishing_ends_the_meeting() -> None:
    room, ended = run(events_of("dev-three-party-vp8"))
    present = sorted(k for k, p in room.meetings[0].publishers.items() if p.present)
    assert present == ["501", "503"] and len(ended) == 1


@pytest.mark.parametrize("name", MEETINGS)
def test_shuffled_duplicated_and_restarted_end_once(name: str) -> None:
    events = events_of(name)
    rng = random.Random(name)
    for _ in range(500):
        replay = events + rng.sample(events, k=len(events) // 2)
        rng.shuffle(replay)
        cut = rng.randrange(len(replay) + 1)
        room = Room(events[0].room)
        ended = [m.id for e in replay[:cut] for m in room.apply(e, 0.0, GRACE)]
        ended += [m.id for m in room.tick(100.0)]  # down for longer than the grace period
        ended += [m.id for e in replay[cut:] for m in room.apply(e, 100.0, GRACE)]
        ended += [m.id for m in room.tick(1000.0)]
        assert len(ended) == 1, (cut, [(e.kind, e.publisher) for e in replay[:cut]])
        assert len(room.pending()) == 1


def test_everyone_gone_ends_after_the_grace_period() -> None:
    events = [e for e in events_of("dev-two-party-h264") if e.kind != "destroyed"]
    room, ended = run(events, now=10.0)
    assert ended == []
    assert room.next_deadline() == 10.0 + GRACE
    assert room.tick(10.0 + GRACE - 0.01) == []
    closed = room.tick(10.0 + GRACE)
    assert len(closed) == 1 and closed[0].ended_by == "empty"
    assert closed[0].end == max(e.ts for e in events)
    # the destroy that follows belongs to nothing new
    late = [e for e in events_of("dev-two-party-h264") if e.kind == "destroyed"]
    assert room.apply(late[0], 20.0, GRACE) == [] and len(room.meetings) == 1


def test_a_closed_connection_counts_as_gone_at_unpublished() -> None:
    """Y's ``unpublished`` (connection closed) makes it gone; once X leaves too, the grace
    period starts, before Y's ``leaving`` arrives."""
    events = [e for e in events_of("dev-two-party-h264") if e.kind != "destroyed"]
    before_y_leaves = [e for e in events if not (e.kind == "leaving" and e.publisher == "512")]
    room, _ = run(before_y_leaves)
    assert room.meetings[0].empty and room.next_deadline() == GRACE


def test_coming_back_within_the_grace_period_keeps_the_meeting() -> None:
    events = [e for e in events_of("dev-two-party-h264") if e.kind != "destroyed"]
    room, _ = run(events)
    back = RoomEvent("2002", "published", events[-1].ts + 1_000_000, "511")
    assert room.apply(back, 1.0, GRACE) == [] and room.next_deadline() is None
    assert room.tick(100.0) == []


def test_a_reused_room_number_is_a_second_meeting() -> None:
    events = events_of("dev-three-party-vp8")
    hour = 3600 * 1_000_000
    later = [dataclasses.replace(e, ts=e.ts + hour) for e in events]
    room, ended = run(events + later + events)  # the first meeting's events again, late
    assert len(ended) == 2 and len(room.meetings) == 2
    assert room.meetings[1].first == events[0].ts + hour


def test_a_late_leaving_after_the_grace_close_starts_nothing() -> None:
    events = [e for e in events_of("dev-two-party-h264") if e.kind != "destroyed"]
    y_leaves = next(e for e in events if e.kind == "leaving" and e.publisher == "512")
    room, _ = run([e for e in events if e != y_leaves])
    assert len(room.tick(GRACE)) == 1
    # Y's session times out a minute later: its leaving comes after the meeting's end
    timed_out = dataclasses.replace(y_leaves, ts=y_leaves.ts + 60_000_000)
    assert timed_out.ts > (room.meetings[0].end or 0)
    assert room.apply(timed_out, 10.0, GRACE) == [] and len(room.meetings) == 1


def test_parse_events_takes_videoroom_events_only() -> None:
    raw = [json.loads(line) for line in
           (FIXTURES / "dev-two-party-h264" / "events.jsonl").read_text().splitlines()]
    assert len(raw) == 112
    events = parse_events(raw)  # one POST holding an array
    assert len(events) == 10
    assert {e.kind for e in events} == {"created", "joined", "published", "unpublished",
                                        "leaving", "destroyed"}
    assert parse_events({"type": 64, "event": {"plugin": "janus.plugin.echotest"}}) == []
    assert parse_events("nonsense") == []


def test_the_render_waits_for_janus_to_close_the_files() -> None:
    events = events_of("dev-two-party-h264")
    room = Room("2002")
    for event in events:
        room.apply(event, 10.0, GRACE, settle=2.0)
    assert room.pending()[0].render == {"state": "pending", "not_before": 12.0}
