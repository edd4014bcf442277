"""The one Celery task: run one unit of a job, under a lease, as one fenced attempt.

An :class:`Attempt` owns a heartbeat thread that renews the lease every
``heartbeat_seconds`` and reads the job's state; when the job is cancelled (or failed
elsewhere), or the lease was lost to the sweeper, it kills the attempt's child processes (melt,
ffmpeg) at once and the attempt ends without writing anything. Progress goes to Redis with the
heartbeat and to Flower as ``task-progress`` events.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded

from melter.errors import MelterError
from melter.farm.procs import kill_children
from melter.farm.store import JobCancelled, LeaseLost

log = logging.getLogger("melter.farm")


class Attempt:
    """One run of one unit by this worker process."""

    def __init__(self, farm: Any, task: Any, job: str, unit: str, token: str, worker: str,
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


def describe(exc: BaseException) -> str:
    if isinstance(exc, MelterError):
        return " ".join(str(exc).split())
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def run_unit(self: Any, job: str, unit: str, token: str) -> dict[str, Any]:
    """Celery task body (registered as ``melter.run_unit`` by :func:`melter.farm.app.make_app`)."""
    from melter.farm import runner
    from melter.farm.app import config_of
    from melter.farm.jobs import farm_for

    farm = farm_for(config_of(self.app))
    farm.use_celery(self.app)
    config = farm.config
    worker = self.request.hostname or socket.gethostname()
    ok, info = farm.store.claim(job, unit, str(token), worker, config.lease_seconds)
    if not ok:
        log.info("job %s %s (token %s): not started: %s", job, unit, token, info)
        return {"job": job, "unit": unit, "skipped": info}
    attempt = Attempt(farm, self, job, unit, str(token), f"{worker}", int(info))
    log.info("job %s %s: attempt %s (token %s) on %s pid %d", job, unit, info, token, worker,
             os.getpid())
    attempt.start()
    outcome = "done"
    try:
        runner.run(attempt)
    except JobCancelled:
        outcome = "cancelled"
    except LeaseLost:
        outcome = "lost"
    except SoftTimeLimitExceeded:
        kill_children()
        outcome = "failed"
        _failed(farm, attempt, f"time limit exceeded ({config.soft_time_limit:.0f} s)",
                permanent=True)
    except Exception as exc:
        if attempt.abort_reason is not None:
            outcome = "cancelled" if attempt.abort_reason == "cancelled" else "lost"
        else:
            outcome = "failed"
            log.error("job %s %s attempt %s failed: %s\n%s", job, unit, attempt.number,
                      describe(exc), traceback.format_exc())
            _failed(farm, attempt, describe(exc))
    finally:
        attempt.stop()
        kill_children()
        runner.cleanup_attempt(attempt)
    if outcome == "cancelled":
        farm.store.finish_cancelled(job, unit, attempt.token)
    if farm.store.job(job).get("state") in ("done", "failed", "cancelled"):
        farm.finalize(job)
        runner.drop_cache(attempt)
    log.info("job %s %s attempt %s: %s", job, unit, attempt.number, outcome)
    return {"job": job, "unit": unit, "outcome": outcome, "attempt": attempt.number}


def _failed(farm: Any, attempt: Attempt, error: str, permanent: bool = False) -> None:
    config = farm.config
    max_attempts = int(farm.store.job(attempt.job).get("max_attempts") or config.max_attempts)
    tries = int(farm.store.unit(attempt.job, attempt.unit).get("tries") or 1)
    delay = -1.0 if permanent else config.retry_backoff_seconds * 2 ** max(0, tries - 1)
    answer = farm.store.fail(attempt.job, attempt.unit, attempt.token, error, delay,
                             max_attempts, attempt.worker)
    if answer and answer[0] == "retry" and delay <= 0:
        from melter.farm.store import Dispatch

        farm.send([Dispatch(attempt.job, attempt.unit, answer[1])])
