"""The room tracker's state in Redis, and the submission of the renders it decides.

Keys (``P`` the farm's key prefix)::

    P:svc:room:<room>   string: the room's meetings (JSON of melter.serve.rooms.Room),
                        expiring ``room_ttl_seconds`` after the room's last change, or
                        ``idle_room_ttl_seconds`` when it holds nothing worth keeping
    P:svc:seen          sorted set: rooms by their last change (trimmed with the same TTL)
    P:svc:idle          sorted set: the rooms holding nothing worth keeping, by last change
    P:svc:clients       set: the client addresses that named rooms followed now
    P:svc:by:<client>   sorted set: the rooms a client's events named first, by when
    P:svc:due           sorted set: rooms by their next grace deadline (wall clock)
    P:svc:pending       set: rooms with a meeting whose render is decided but not yet submitted
    P:svc:failed        hash: room -> JSON {error, at} of the last pass that failed on it
    P:svc:stats         hash: counters (events, events dropped by reason, auto renders
                        submitted, skipped, failed, rooms that failed)

Each room is updated in one optimistic transaction (WATCH/MULTI), so concurrent requests and
a ticking service see one order of events. A meeting's end and its "render pending" mark are
written together; the job is submitted afterwards with an idempotency key naming the meeting,
then marked submitted. A service that dies between the two finds the pending mark when it
starts again and submits again, which returns the same job: nothing is lost, nothing doubled.

Every key expires or is trimmed: Janus names rooms, and nothing it sends may keep memory under
Redis's ``noeviction`` for good. A room that fails (a state this version cannot read, a spec
that cannot be made) is logged and marked in ``P:svc:failed``, and the pass goes on with the
other rooms: one bad room never stops the automatic renders of the rest.

Rooms are bounded too: at most ``max_rooms`` are followed. A room that is created and never
used, or whose meetings had nothing to render, expires after ``idle_room_ttl_seconds`` and is
the first forgotten when a new room needs its place; events of a new room are dropped (and
counted) only when every followed room holds a live meeting or a render. Then a client naming
a new room takes the place of the oldest room of the client that named the most, as long as
that client holds more rooms than the asking one: a client posting thousands of names (with
Janus's credentials) crowds out only itself, never the rooms of a Janus that posts a few.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from melter.errors import MelterError
from melter.farm.job import TERMINAL, Priority
from melter.farm.jobs import Farm
from melter.serve.config import Settings
from melter.serve.renders import auto_spec, recordings
from melter.serve.rooms import MeetingSpan, Room, RoomEvent

log = logging.getLogger("melter.serve")

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

    @property
    def ttl(self) -> int:
        return int(self.settings.service.room_ttl_seconds)

    @property
    def idle_ttl(self) -> int:
        return min(self.ttl, int(self.settings.service.idle_room_ttl_seconds))

    # -- state -------------------------------------------------------------------------------
    def _update(self, room: str, change: Callable[[Room], T]) -> T:
        key = self.room_key(room)
        result: list[T] = []

        def transaction(pipe: Any) -> None:
            raw = pipe.get(key)
            state = Room.from_json(raw) if raw else Room(room)
            result[:] = [change(state)]
            keep = state.worth_keeping()
            now = time.time()
            pipe.multi()
            pipe.set(key, state.to_json(), ex=self.ttl if keep else self.idle_ttl)
            pipe.zadd(f"{self.p}:seen", {room: now})
            if keep:
                pipe.zrem(f"{self.p}:idle", room)
            else:
                pipe.zadd(f"{self.p}:idle", {room: now})
            deadline = state.next_deadline()
            if deadline is None:
                pipe.zrem(f"{self.p}:due", room)
            else:
                pipe.zadd(f"{self.p}:due", {room: deadline})
            if state.pending():
                pipe.sadd(f"{self.p}:pending", room)
            else:
                pipe.srem(f"{self.p}:pending", room)
            if state.live():
                pipe.sadd(f"{self.p}:live", room)
            else:
                pipe.srem(f"{self.p}:live", room)

        self.r.transaction(transaction, key)
        return result[0]

    def room(self, room: str) -> Room | None:
        raw = self.r.get(self.room_key(room))
        return Room.from_json(raw) if raw else None

    def rooms(self) -> list[str]:
        return sorted(self.r.zrange(f"{self.p}:seen", 0, -1))

    def count(self, name: str, by: int = 1) -> None:
        self.r.hincrby(f"{self.p}:stats", name, by)

    def failures(self) -> dict[str, dict[str, Any]]:
        """The rooms a pass failed on: their last error and when."""
        return {room: json.loads(v) for room, v in self.r.hgetall(f"{self.p}:failed").items()}

    def _failed(self, room: str, what: str, exc: Exception) -> None:
        """Log and mark a room a pass failed on, so the pass can go on with the others."""
        log.exception("room %s: %s failed; the other rooms go on", room, what)
        key = f"{self.p}:failed"
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(key, room, json.dumps(
            {"error": f"{what}: {type(exc).__name__}: {exc}"[:500], "at": time.time()}))
        pipe.expire(key, self.ttl)
        pipe.hincrby(f"{self.p}:stats", "room_failures", 1)
        pipe.execute()

    def expire_rooms(self, now: float | None = None) -> int:
        """Forget the rooms whose state expired; how many."""
        now = time.time() if now is None else now
        old = set(self.r.zrangebyscore(f"{self.p}:seen", "-inf", now - self.ttl))
        old.update(self.r.zrangebyscore(f"{self.p}:idle", "-inf", now - self.idle_ttl))
        self._forget(sorted(old), delete=False)
        return len(old)

    def _forget(self, rooms: list[str], delete: bool) -> None:
        if not rooms:
            return
        clients = sorted(self.r.smembers(f"{self.p}:clients"))
        pipe = self.r.pipeline(transaction=False)
        for client in clients:
            pipe.zrem(f"{self.p}:by:{client}", *rooms)
            pipe.exists(f"{self.p}:by:{client}")
        if delete:
            pipe.delete(*[self.room_key(room) for room in rooms])
        pipe.zrem(f"{self.p}:seen", *rooms)
        pipe.zrem(f"{self.p}:idle", *rooms)
        pipe.zrem(f"{self.p}:due", *rooms)
        pipe.srem(f"{self.p}:pending", *rooms)
        pipe.srem(f"{self.p}:live", *rooms)
        pipe.hdel(f"{self.p}:failed", *rooms)
        answers = pipe.execute()
        gone = [c for k, c in enumerate(clients) if not answers[2 * k + 1]]
        if gone:
            self.r.srem(f"{self.p}:clients", *gone)

    def admit(self, rooms: list[str], client: str = "local") -> set[str]:
        """The rooms among ``rooms`` whose events may be taken: every room already followed,
        and new ones while fewer than ``max_rooms`` are followed, making place by forgetting
        idle rooms, oldest first, then rooms of the client holding the most, while it holds
        more than ``client``."""
        seen = f"{self.p}:seen"
        pipe = self.r.pipeline(transaction=False)
        for room in rooms:
            pipe.zscore(seen, room)
        pipe.zcard(seen)
        *scores, followed = pipe.execute()
        new = [room for room, score in zip(rooms, scores, strict=True) if score is None]
        limit = int(self.settings.service.max_rooms)
        excess = followed + len(new) - limit
        if new and excess > 0:
            idle = [room for room, _ in self.r.zpopmin(f"{self.p}:idle", excess)]
            self._forget(idle, delete=True)
            if idle:
                self.count("idle_rooms_forgotten", len(idle))
            followed -= len(idle)
            excess -= len(idle)
            if excess > 0:
                followed -= self._crowd_out(client, excess)
        room_for = max(0, limit - followed)
        admitted_new = new[:room_for]
        if admitted_new:
            now = time.time()
            pipe = self.r.pipeline(transaction=False)
            pipe.zadd(f"{self.p}:by:{client}", dict.fromkeys(admitted_new, now))
            pipe.sadd(f"{self.p}:clients", client)
            pipe.execute()
        refused = set(new[room_for:])
        return {room for room in rooms if room not in refused}

    def holdings(self) -> dict[str, int]:
        """How many followed rooms each client address named first."""
        clients = sorted(self.r.smembers(f"{self.p}:clients"))
        pipe = self.r.pipeline(transaction=False)
        for client in clients:
            pipe.zcard(f"{self.p}:by:{client}")
        return {c: n for c, n in zip(clients, pipe.execute(), strict=True) if n}

    def _crowd_out(self, client: str, wanted: int) -> int:
        """Forget up to ``wanted`` rooms of the clients holding the most, each down to what
        ``client`` holds; how many were forgotten."""
        forgotten = 0
        while forgotten < wanted:
            held = self.holdings()
            if not held:
                break
            owner = max(held, key=lambda c: held[c])
            room_for = min(wanted - forgotten, held[owner] - held.get(client, 0) - 1)
            if owner == client or room_for <= 0:
                break
            oldest = self.r.zrange(f"{self.p}:by:{owner}", 0, room_for - 1)
            if not oldest:
                break
            self._forget(oldest, delete=True)
            forgotten += len(oldest)
            self.count("rooms_crowded_out", len(oldest))
        return forgotten

    def stats(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(f"{self.p}:stats").items()}

    # -- events and time ---------------------------------------------------------------------
    def handle(self, events: list[RoomEvent], now: float | None = None,
               client: str = "local") -> list[str]:
        """Apply events (grouped by room, each room in order of arrival) that ``client`` (an
        address) posted; the ids of the meetings that ended."""
        now = time.time() if now is None else now
        grace = self.settings.service.grace_seconds
        settle = self.settings.service.settle_seconds
        by_room: dict[str, list[RoomEvent]] = {}
        for event in events:
            by_room.setdefault(event.room, []).append(event)
        admitted = self.admit(list(by_room), client) if by_room else set()
        refused = [room for room in by_room if room not in admitted]
        if refused:
            dropped = sum(len(by_room.pop(room)) for room in refused)
            self.count("dropped_room_limit", dropped)
            log.warning("%d events of %d new rooms dropped: %d rooms followed, none idle "
                        "(MELTER_MAX_ROOMS)", dropped, len(refused),
                        self.settings.service.max_rooms)
        ended: list[str] = []
        for room, items in by_room.items():
            def change(state: Room, items: list[RoomEvent] = items) -> list[str]:
                out: list[str] = []
                for event in items:
                    out += [m.id for m in state.apply(event, now, grace, settle)]
                return out

            try:
                ended += self._update(room, change)
            except redis.RedisError:
                raise
            except Exception as exc:  # the other rooms of the POST still count
                self._failed(room, "events", exc)
        if events:
            self.count("events", len(events))
        return ended

    def tick(self, now: float | None = None) -> list[str]:
        """End the meetings whose grace period passed; their ids."""
        now = time.time() if now is None else now
        ended: list[str] = []
        for room in self.r.zrangebyscore(f"{self.p}:due", "-inf", now):
            try:
                ended += self._update(room, lambda state: [
                    m.id for m in state.tick(now, self.settings.service.settle_seconds)])
            except redis.RedisError:
                raise
            except Exception as exc:  # one room's state must not stop the others' renders
                self._failed(room, "grace deadline", exc)
                self.r.zrem(f"{self.p}:due", room)
        return ended

    # -- renders -----------------------------------------------------------------------------
    def submit_pending(self, now: float | None = None) -> list[str]:
        """Submit the render of every meeting that ended (and settled) and has none yet; the
        job ids."""
        now = time.time() if now is None else now
        jobs = []
        for room in sorted(self.r.smembers(f"{self.p}:pending")):
            try:
                state = self.room(room)
                if state is None:  # expired
                    self.r.srem(f"{self.p}:pending", room)
                    continue
                for meeting in state.pending():
                    if float((meeting.render or {}).get("not_before", 0)) > now:
                        continue
                    job = self._submit(room, meeting.id)
                    if job:
                        jobs.append(job)
            except redis.RedisError:
                raise
            except Exception as exc:  # one room's state must not stop the others' renders
                self._failed(room, "render submission", exc)
                self._give_up(room, exc)
        return jobs

    def prerender_live(self, now: float | None = None) -> list[str]:
        """While meetings go on, render the chunks their recordings already hold for good
        (a prerender job each, every ``prerender_seconds`` once the last one ended): when a
        meeting ends, its render finds them kept and renders only the rest. The job ids."""
        now = time.time() if now is None else now
        every = self.settings.service.prerender_seconds
        if every <= 0:
            return []
        jobs = []
        for room in sorted(self.r.smembers(f"{self.p}:live")):
            try:
                state = self.room(room)
                if state is None:  # expired
                    self.r.srem(f"{self.p}:live", room)
                    continue
                for meeting in state.live():
                    done = meeting.prerender or {}
                    since = float(done.get("at") or meeting.first / 1e6)
                    if now - since < every or not self._ended(done):
                        continue
                    job = self._prerender(room, meeting.id, now)
                    if job:
                        jobs.append(job)
            except redis.RedisError:
                raise
            except Exception as exc:  # one room's state must not stop the others' renders
                self._failed(room, "prerender", exc)
        return jobs

    def _ended(self, prerender: dict[str, Any]) -> bool:
        """Whether a meeting's latest prerender job (if any) has ended."""
        job = prerender.get("job")
        if not job:
            return True
        try:
            return self.farm.status(job)["state"] in TERMINAL
        except MelterError:  # its record expired
            return True

    def _prerender(self, room: str, meeting_id: str, now: float) -> str | None:
        state = self.room(room)
        meeting = state.meeting(meeting_id) if state else None
        if state is None or meeting is None or not meeting.open:
            return None
        count = int((meeting.prerender or {}).get("n") or 0) + 1
        try:
            spec = self._spec(state, meeting)
        except (MelterError, ValueError):
            spec = None  # no recordings yet
        job = None
        if spec is not None:
            spec.update(prerender=True, priority=Priority.LIVE,
                        idempotency_key=f"{spec['idempotency_key']}:pre:{count}")
            try:
                job = self.farm.submit(spec)
            except MelterError as exc:
                log.warning("meeting %s: prerender refused: %s", meeting_id, exc)

        def mark(state: Room) -> None:
            current = state.meeting(meeting_id)
            if current is not None and current.open:
                current.prerender = {"job": job, "at": now, "n": count}

        self._update(room, mark)
        if job:
            self.count("prerenders_submitted")
        return job

    def _give_up(self, room: str, exc: Exception) -> None:
        """Mark the room's pending renders failed, so the next pass does not fail the same
        way; a state that cannot even be read leaves the pending set."""
        def mark(state: Room) -> None:
            for meeting in state.pending():
                meeting.render = {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}

        try:
            self._update(room, mark)
            self.count("auto_failed")
        except redis.RedisError:
            raise
        except Exception:
            self.r.srem(f"{self.p}:pending", room)

    def _spec(self, state: Room, meeting: MeetingSpan) -> dict[str, Any]:
        before, after = state.neighbours(meeting)
        files = [r.path for r in recordings(self.settings.recordings, meeting.room)
                 if (before is None or before.end is None or r.stamp > before.end)
                 and (after is None or r.stamp < after.first)]
        if not files:
            raise MelterError(f"no recordings of room {meeting.room} in "
                              f"{self.settings.recordings} (MELTER_RECORDINGS_DIR)")
        return auto_spec(self.settings, meeting.room, meeting.id,
                         int(meeting.id.rsplit("-", 1)[1]), files, "janus",
                         {"ended_by": meeting.ended_by}, prerendered=True)

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
