"""The sweeper every worker runs: expired leases, due dispatches, stale caches.

Every ``sweep_seconds`` (with jitter) one worker of the farm — whichever takes the sweep lock —
requeues the units whose lease expired (their worker died: killed, out of memory, its machine
gone), sends the messages of units whose dispatch is due (retries after their back-off, and
dispatches whose sender died before confirming), and fails a unit that used up its attempts.
Each worker also removes its local cache of prepared media for jobs that have ended, and one
worker at a time removes kept chunks no render came for (see :func:`sweep_parts`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

import redis
from celery import Celery

from melter.errors import MelterError
from melter.farm.callbacks import Deliverer
from melter.farm.celery_app import config_of
from melter.farm.job import TERMINAL
from melter.farm.jobs import Farm
from melter.farm.paths import folder_fd

log = logging.getLogger("melter.farm.sweeper")

_THREAD: Sweeper | None = None


def sweep_once(farm: Farm, owner: str) -> dict[str, int]:
    """One pass; counts of what was done."""
    config = farm.config
    store = farm.store
    counts = {"expired": 0, "failed": 0, "sent": 0}
    if not store.sweep_lock(owner, config.sweep_seconds * 0.8):
        return counts
    for item in store.running():
        if store.lease_alive(item.job, item.unit):
            continue
        max_attempts = int(store.job(item.job).get("max_attempts") or config.max_attempts)
        answer = store.expire(item.job, item.unit, item.token, max_attempts)
        if not answer or answer[0] in ("alive", "stale"):
            continue
        log.warning("job %s %s: attempt with token %s lost its lease: %s", item.job, item.unit,
                    item.token, answer[0])
        counts["expired"] += 1
        if answer[0] in ("failed", "stopped"):
            counts["failed"] += answer[0] == "failed"
            farm.finalize(item.job)
    due = store.due(time.time())
    if due:
        farm.send(due)
        counts["sent"] += len(due)
    counts["uncounted"] = store.reap()  # expired job records leave the job counters
    return counts


#: What a kept chunk is called: its key, then a media suffix (see melter.farm.runner).
_PART_NAME = re.compile(r"[0-9a-f]{64}\.[a-z0-9]{2,5}")


def sweep_parts(farm: Farm, now: float | None = None) -> int:
    """Remove the kept chunks of folders no chunk was kept in for ``parts_ttl_hours`` (a
    meeting whose render never came, or came by another layout, leaves its prerendered
    chunks behind), then each folder once empty; the number of files removed.

    Only files named as chunks are, and only those not written to within that time; the
    folders are reached from the outputs root without following links."""
    config = farm.config
    now = time.time() if now is None else now
    cutoff = now - config.parts_ttl_hours * 3600
    removed = 0
    for folder, seen in farm.store.stale_parts(cutoff):
        place = Path(folder)
        with contextlib.suppress(OSError, MelterError):
            with folder_fd(config.outputs_root, place) as parts:
                for name in os.listdir(parts):
                    info = os.stat(name, dir_fd=parts, follow_symlinks=False)
                    if _PART_NAME.fullmatch(name) and stat.S_ISREG(info.st_mode) \
                            and info.st_mtime < cutoff:
                        os.unlink(name, dir_fd=parts)
                        removed += 1
            with folder_fd(config.outputs_root, place.parent) as parent:
                os.rmdir(place.name, dir_fd=parent)
        farm.store.forget_parts(folder, seen)
    return removed


def clean_cache(farm: Farm) -> None:
    root = farm.config.cache_dir or Path(tempfile.gettempdir()) / "melter-farm-cache"
    if not root.is_dir():
        return
    for folder in root.iterdir():
        state = farm.store.job(folder.name).get("state")
        if state is None or state in TERMINAL:
            shutil.rmtree(folder, ignore_errors=True)


class Sweeper(threading.Thread):
    def __init__(self, celery: Celery, owner: str) -> None:
        super().__init__(name="melter-sweeper", daemon=True)
        self.celery = celery
        self.owner = owner
        self.stopping = threading.Event()

    def run(self) -> None:
        farm = Farm(config_of(self.celery), self.celery)
        interval = farm.config.sweep_seconds
        passes = 0
        while not self.stopping.wait(interval * random.uniform(0.8, 1.2)):
            try:
                sweep_once(farm, self.owner)
                passes += 1
                if passes % 30 == 1:
                    clean_cache(farm)
                    if farm.store.sweep_lock(self.owner, farm.config.sweep_seconds * 25,
                                             "sweeper:parts"):
                        sweep_parts(farm)
            except redis.RedisError as exc:
                log.warning("sweeper: Redis unavailable (%s)", exc)
            except Exception:
                log.exception("sweeper pass failed")


def start_sweeper(celery: Celery, owner: str) -> None:
    global _THREAD
    if _THREAD is not None and _THREAD.is_alive():
        return
    _THREAD = Sweeper(celery, owner)
    _THREAD.start()
    log.info("sweeper started for %s", owner)


def stop_sweeper() -> None:
    if _THREAD is not None:
        _THREAD.stopping.set()


_DELIVERER: Deliverer | None = None
PRESENCE_SECONDS = 10


def presence_key(prefix: str, worker: str) -> str:
    """``P:worker:<name>``: set by each live worker, expiring ``PRESENCE_SECONDS`` after it
    stops (the service's worker count)."""
    return f"{prefix}:worker:{worker}"


def start_deliverer(celery: Celery, owner: str) -> None:
    """The worker's status-callback deliverer (its own thread: a slow receiver holds up
    neither renders nor sweeps); it also keeps the worker's presence key alive."""
    global _DELIVERER
    if _DELIVERER is not None and _DELIVERER.is_alive():
        return
    farm = Farm(config_of(celery), celery)
    key = presence_key(farm.store.p, owner)

    def present() -> None:
        farm.store.present(key, PRESENCE_SECONDS)

    _DELIVERER = Deliverer(farm, on_pass=present)
    _DELIVERER.presence = key
    _DELIVERER.start()


def stop_deliverer() -> None:
    if _DELIVERER is not None:
        _DELIVERER.stop()
        with contextlib.suppress(Exception):
            _DELIVERER.outbox.store.absent(_DELIVERER.presence)
