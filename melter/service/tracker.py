"""The room tracker's state in Redis, and the submission of the renders it decides.

Keys (``P`` the farm's key prefix)::

    P:svc:room:<room>   string: the room's meetings (JSON of melter.service.rooms.Room)
    P:svc:due           sorted set: rooms by their next grace deadline (wall clock)
    P:svc:pending       set: rooms with a meeting whose render is decided but not yet submitted
    P:svc:stats         hash: counters (events, auto renders submitted, skipped)

Each room is updated in one optimistic transaction (WATCH/MULTI), so concurrent requests and
a ticking service see one order of events. A meeting's end and its "render pending" mark are
written together; the job is submitted afterwards with an idempotency key naming the meeting,
then marked submitted. A service that dies between the two finds the pending mark when it
starts again and submits again, which returns the same job: nothing is lost, nothing doubled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from melter.errors import MelterError
from melter.farm.service import Farm
from melter.service.config import Settings
from melter.service.renders import auto_spec, recordings
from melter.service.rooms import Meeting, Room, RoomEvent

log = logging.getLogger("melter.service")

T = TypeVar("T")


class Tracker:
    """Rooms of one farm, followed from Janus events."""

    def __init__(self, settings: Settings, farm: Farm) -> None:
        self.settings = settings
        self.farm = farm
        self.r: Any = farm.store.r
        self.p = f"{farm.store.p}:svc"

    def room_key(self, room: str) -> str:
        return f"{self.p}:room:{room}"

    # -- state -------------------------------------------------------------------------------
    def _update(self, room: str, change: Callable[[Room], T]) -> T:
        key = self.room_key(room)
        result: list[T] = []

        def transaction(pipe: Any) -> None:
            raw = pipe.get(key)
            state = Room.from_json(raw) if raw else Room(room)
            result[:] = [change(state)]
            pipe.multi()
            pipe.set(key, state.to_json())
            pipe.sadd(f"{self.p}:rooms", room)
            deadline = state.next_deadline()
            if deadline is None:
                pipe.zrem(f"{self.p}:due", room)
            else:
                pipe.zadd(f"{self.p}:due", {room: deadline})
            if state.pending():
                pipe.sadd(f"{self.p}:pending", room)
            else:
                pipe.srem(f"{self.p}:pending", room)

        self.r.transaction(transaction, key)
        return result[0]

    def room(self, room: str) -> Room | None:
        raw = self.r.get(self.room_key(room))
        return Room.from_json(raw) if raw else None

    def rooms(self) -> list[str]:
        return sorted(self.r.smembers(f"{self.p}:rooms"))

    def count(self, name: str, by: int = 1) -> None:
        self.r.hincrby(f"{self.p}:stats", name, by)

    def stats(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(f"{self.p}:stats").items()}

    # -- events and time ---------------------------------------------------------------------
    def handle(self, events: list[RoomEvent], now: float | None = None) -> list[str]:
        """Apply events (grouped by room, each room in order of arrival); the ids of the
        meetings that ended."""
        now = time.time() if now is None else now
        grace = self.settings.service.grace_seconds
        settle = self.settings.service.settle_seconds
        by_room: dict[str, list[RoomEvent]] = {}
        for event in events:
            by_room.setdefault(event.room, []).append(event)
        ended: list[str] = []
        for room, items in by_room.items():
            def change(state: Room, items: list[RoomEvent] = items) -> list[str]:
                out: list[str] = []
                for event in items:
                    out += [m.id for m in state.apply(event, now, grace, settle)]
                return out

            ended += self._update(room, change)
        if events:
            self.count("events", len(events))
        return ended

    def tick(self, now: float | None = None) -> list[str]:
        """End the meetings whose grace period passed; their ids."""
        now = time.time() if now is None else now
        ended: list[str] = []
        for room in self.r.zrangebyscore(f"{self.p}:due", "-inf", now):
            ended += self._update(room, lambda state: [
                m.id for m in state.tick(now, self.settings.service.settle_seconds)])
        return ended

    # -- renders -----------------------------------------------------------------------------
    def submit_pending(self, now: float | None = None) -> list[str]:
        """Submit the render of every meeting that ended (and settled) and has none yet; the
        job ids."""
        now = time.time() if now is None else now
        jobs = []
        for room in sorted(self.r.smembers(f"{self.p}:pending")):
            state = self.room(room)
            for meeting in state.pending() if state else []:
                if float((meeting.render or {}).get("not_before", 0)) > now:
                    continue
                job = self._submit(room, meeting.id)
                if job:
                    jobs.append(job)
        return jobs

    def _spec(self, state: Room, meeting: Meeting) -> dict[str, Any]:
        before, after = state.neighbours(meeting)
        files = [r.path for r in recordings(self.settings.recordings, meeting.room)
                 if (before is None or before.end is None or r.stamp > before.end)
                 and (after is None or r.stamp < after.first)]
        if not files:
            raise MelterError(f"no recordings of room {meeting.room} in "
                              f"{self.settings.recordings} (MELTER_RECORDINGS_DIR)")
        return auto_spec(self.settings, meeting.room, meeting.id,
                         int(meeting.id.rsplit("-", 1)[1]), files, "janus",
                         {"ended_by": meeting.ended_by})

    def _submit(self, room: str, meeting_id: str) -> str | None:
        # 1. the job document, decided once and kept (a resubmission must be the same job)
        def decide(state: Room) -> dict[str, Any] | None:
            meeting = state.meeting(meeting_id)
            if meeting is None or not meeting.render or meeting.render["state"] != "pending":
                return None
            if "spec" not in meeting.render:
                try:
                    meeting.render["spec"] = self._spec(state, meeting)
                except (MelterError, ValueError) as exc:
                    meeting.render = {"state": "skipped", "error": str(exc)}
                    log.warning("meeting %s: not rendered: %s", meeting_id, exc)
                    return None
            return dict(meeting.render["spec"])

        spec = self._update(room, decide)
        if spec is None:
            return None
        # 2. the job (idempotent), then the mark
        try:
            job: str | None = self.farm.submit(spec)
            outcome: dict[str, Any] = {"state": "submitted", "job": job, "spec": spec}
        except MelterError as exc:
            job = None
            outcome = {"state": "skipped", "error": str(exc), "spec": spec}
            log.warning("meeting %s: farm refused the render: %s", meeting_id, exc)

        def mark(state: Room) -> bool:
            meeting = state.meeting(meeting_id)
            if meeting is not None and meeting.render and meeting.render["state"] == "pending":
                meeting.render = outcome
                return True
            return False

        if self._update(room, mark):
            self.count("auto_submitted" if job else "auto_skipped")
        if job:
            log.info("meeting %s (%s): render job %s", meeting_id, room, job)
        return job
