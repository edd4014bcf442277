"""``melter watch DIR``: renders without an event handler, when a room's files stop growing.

Janus writes a recording while its publisher sends; a room whose MJR files have all kept their
size for ``quiet_seconds`` is over. Each poll records every file's size, and when it last
changed (wall clock), in Redis, so a restarted watcher keeps counting where it was; the files a
render was submitted for are marked, and the next render of the same room (a later meeting,
Janus reuses room numbers) takes only newer files. The submission's idempotency key names the
room and its first file, so a watcher that died between submitting and marking submits the same
job again, not a second one.

Keys: ``P:svc:watch:<folder hash>:files`` (hash: path → size, mtime, changed) and
``…:done`` (set: paths already rendered).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import redis

from melter.errors import MelterError
from melter.farm.jobs import Farm
from melter.serve.config import Settings
from melter.serve.renders import auto_spec, recordings

log = logging.getLogger("melter.watch")


class Watcher:
    """One folder of recordings, polled."""

    def __init__(self, settings: Settings, farm: Farm, folder: Path,
                 quiet_seconds: float) -> None:
        self.settings = settings
        self.farm = farm
        self.folder = folder.resolve()
        self.quiet = quiet_seconds
        self.r: Any = farm.store.r
        tag = hashlib.sha256(str(self.folder).encode()).hexdigest()[:16]
        self.key = f"{farm.store.p}:svc:watch:{tag}"

    def poll(self, now: float | None = None) -> list[str]:
        """One look at the folder; the jobs submitted."""
        now = time.time() if now is None else now
        known = {k: json.loads(v) for k, v in self.r.hgetall(f"{self.key}:files").items()}
        done = set(self.r.smembers(f"{self.key}:done"))
        updates: dict[str, str] = {}
        rooms: dict[str, list[tuple[Any, float]]] = {}
        for rec in recordings(self.folder):
            name = str(rec.path)
            if name in done:
                continue
            try:
                info = rec.path.stat()
            except OSError:
                continue
            seen = known.get(name)
            if seen is None or seen["size"] != info.st_size or seen["mtime"] != info.st_mtime:
                seen = {"size": info.st_size, "mtime": info.st_mtime, "changed": now}
                updates[name] = json.dumps(seen)
            rooms.setdefault(rec.room, []).append((rec, seen["changed"]))
        if updates:
            self.r.hset(f"{self.key}:files", mapping=updates)
        jobs = []
        for room, files in sorted(rooms.items()):
            if max(changed for _, changed in files) + self.quiet > now:
                continue
            job = self._submit(room, [rec for rec, _ in files])
            if job:
                jobs.append(job)
        return jobs

    def _submit(self, room: str, files: list[Any]) -> str | None:
        first = min(rec.stamp for rec in files)
        meeting = f"{room}-{first}"
        paths = [str(rec.path) for rec in files]
        try:
            spec = auto_spec(self.settings, room, meeting, first, [rec.path for rec in files],
                             "watch", {"folder": str(self.folder)})
            job: str | None = self.farm.submit(spec)
            log.info("room %s: %d files quiet for %.0f s: render job %s", room, len(paths),
                     self.quiet, job)
        except (MelterError, ValueError) as exc:
            log.warning("room %s: not rendered: %s", room, exc)
            job = None
        pipe = self.r.pipeline()
        pipe.sadd(f"{self.key}:done", *paths)
        pipe.hdel(f"{self.key}:files", *paths)
        pipe.execute()
        return job

    def run(self, interval: float | None = None) -> None:
        """Poll until interrupted."""
        step = interval or max(0.2, min(2.0, self.quiet / 4))
        while True:
            try:
                self.poll()
            except redis.RedisError as exc:  # Redis restarting: the state waits there
                log.warning("Redis unavailable (%s); polling on", exc)
            time.sleep(step)
