"""The one Celery task: run one unit of a job, under a lease, as one fenced attempt
(:class:`~melter.farm.attempt.Attempt`: its heartbeat, progress and fencing).

Importing this module registers the task, named :data:`melter.farm.celery_app.TASK`, on the Celery
apps of the process (:mod:`melter.farm.worker` does, for the worker's app).
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
from typing import Any

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded

from melter.errors import MelterError
from melter.farm import runner
from melter.farm.attempt import Attempt
from melter.farm.celery_app import TASK, config_of
from melter.farm.job import TERMINAL
from melter.farm.jobs import Farm, farm_for
from melter.farm.procs import kill_children
from melter.farm.store import Dispatch, JobCancelled, LeaseLost

log = logging.getLogger("melter.farm")


def describe(exc: BaseException) -> str:
    if isinstance(exc, MelterError):
        return " ".join(str(exc).split())
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


@shared_task(name=TASK, bind=True)
def run_unit(self: Task, job: str, unit: str, token: str) -> dict[str, Any]:
    """Run one unit; the farm's messages go through the app running the task."""
    farm = farm_for(config_of(self.app), self.app)
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
    if farm.store.job(job).get("state") in TERMINAL:
        farm.finalize(job)
        runner.drop_cache(attempt)
    log.info("job %s %s attempt %s: %s", job, unit, attempt.number, outcome)
    return {"job": job, "unit": unit, "outcome": outcome, "attempt": attempt.number}


def _failed(farm: Farm, attempt: Attempt, error: str, permanent: bool = False) -> None:
    config = farm.config
    max_attempts = int(farm.store.job(attempt.job).get("max_attempts") or config.max_attempts)
    tries = int(farm.store.unit(attempt.job, attempt.unit).get("tries") or 1)
    delay = -1.0 if permanent else config.retry_backoff_seconds * 2 ** max(0, tries - 1)
    answer = farm.store.fail(attempt.job, attempt.unit, attempt.token, error, delay,
                             max_attempts, attempt.worker)
    if answer and answer[0] == "retry" and delay <= 0:
        farm.send([Dispatch(attempt.job, attempt.unit, answer[1])])
