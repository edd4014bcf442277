"""One run of one unit by a worker process, under a lease: an :class:`Attempt`.

It owns a heartbeat thread that renews the lease every ``heartbeat_seconds`` and reads the
job's state; when the job is cancelled (or failed elsewhere), or the lease was lost to the
sweeper, it kills the attempt's child processes (melt, ffmpeg) at once and the attempt ends
without writing anything. Progress goes to Redis with the heartbeat and to Flower as
``task-progress`` events of the Celery task running it (:mod:`melter.farm.tasks`).
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from celery import Task

from melter.farm.jobs import Farm
from melter.farm.procs import kill_children
from melter.farm.store import JobCancelled, LeaseLost

log = logging.getLogger("melter.farm")


class Attempt:
    """One run of one unit by this worker process."""

    def __init__(self, farm: Farm, task: Task, job: str, unit: str, token: str, worker: str,
                 number: int) -> None:
        self.farm = farm
        self.config = farm.config
        self.store = farm.store
        self.task = task
        self.job = job
        self.unit = unit
        self.token = token
        self.worker = worker
        self.number = number
        self.started = time.time()
        self.fraction = 0.0
        self.stage_name = "starting"
        self.abort_reason: str | None = None
        self._aborted = threading.Event()
        self._stop = threading.Event()
        self._finishing = threading.Event()
        self._window = (0.0, 1.0)
        self._last_event = 0.0
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job}-{unit}",
                                        daemon=True)

    # -- heartbeat ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        interval = self.config.heartbeat_seconds
        while not self._stop.wait(interval):
            try:
                answer = self.store.heartbeat(self.job, self.unit, self.token,
                                              self.config.lease_seconds, self.fraction,
                                              self.stage_name)
            except redis.RedisError as exc:
                log.warning("job %s %s: heartbeat failed (%s); rendering on", self.job,
                            self.unit, exc)
                continue
            if self._finishing.is_set():
                return  # the unit was completed: its lease is gone on purpose
            if answer in ("lost", "cancelled"):
                self.abort(answer)
                return

    def abort(self, reason: str) -> None:
        if self.abort_reason is None:
            self.abort_reason = reason
        self._aborted.set()
        killed = kill_children()
        log.warning("job %s %s attempt %s: %s, %d child process(es) killed", self.job,
                    self.unit, self.number, reason, killed)

    def check(self) -> None:
        if self._aborted.is_set():
            self.raise_abort()

    def raise_abort(self) -> None:
        if self.abort_reason == "lost":
            raise LeaseLost(f"{self.job} {self.unit}")
        raise JobCancelled(self.job)

    # -- progress ----------------------------------------------------------------------------
    def window(self, start: float, span: float) -> None:
        """Map the following progress reports onto ``start`` … ``start + span`` of the unit."""
        self._window = (start, span)

    def stage(self, name: str) -> None:
        self.stage_name = name
        self.check()
        self._event(force=True)

    def progress(self, frame: int, frames: int) -> None:
        """run_melt's callback: raising here makes run_melt kill melt."""
        self.check()
        start, span = self._window
        self.fraction = min(1.0, start + span * (frame / max(1, frames)))
        self._event()

    def _event(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_event < 1.0:
            return
        self._last_event = now
        elapsed = time.time() - self.started
        eta = elapsed * (1 - self.fraction) / self.fraction if self.fraction > 0.01 else None
        try:
            self.task.send_event("task-progress", retry=False, job=self.job, unit=self.unit,
                                 stage=self.stage_name, progress=round(self.fraction * 100, 1),
                                 eta=round(eta, 1) if eta is not None else None,
                                 attempt=self.number)
        except Exception as exc:  # events are best effort
            log.debug("task-progress event not sent: %s", exc)

    # -- commit ------------------------------------------------------------------------------
    def begin_commit(self) -> None:
        """Enter the commit: only while this attempt still holds the lease (fencing)."""
        self.check()
        self.stage_name = "committing"
        self.store.begin_commit(self.job, self.unit, self.token, self.config.lease_seconds)
        # Progress events are sent at most once a second: without this one, a unit that
        # renders in under a second would show 0 % to the end.
        self._event(force=True)

    def finishing(self) -> None:
        """Called just before the unit is marked done: heartbeats stop mattering."""
        self._finishing.set()
