"""The sweeper every worker runs: expired leases, due dispatches, stale caches.

Every ``sweep_seconds`` (with jitter) one worker of the farm — whichever takes the sweep lock —
requeues the units whose lease expired (their worker died: killed, out of memory, its machine
gone), sends the messages of units whose dispatch is due (retries after their back-off, and
dispatches whose sender died before confirming), and fails a unit that used up its attempts.
Each worker also removes its local cache of prepared media for jobs that have ended.
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import redis
from celery import Celery

from melter.farm.callbacks import Deliverer
from melter.farm.celery_app import config_of
from melter.farm.job import TERMINAL
from melter.farm.jobs import Farm

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
