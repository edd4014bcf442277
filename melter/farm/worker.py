"""The farm worker: ``celery -A melter.farm.worker worker`` (or ``melter worker``) runs
:data:`app`, the farm's Celery app (:mod:`melter.farm.celery_app`) for the configuration in the
environment, with the task of :mod:`melter.farm.tasks` registered on it.

The worker signals connected here start the sweeper and the status-callback deliverer
(:mod:`melter.farm.sweeper`) when the worker is ready and stop them when it shuts down, and
import the render stack in each new pool process, not in its first job's time.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from melter.farm import tasks
from melter.farm.celery_app import make_app
from melter.farm.config import FarmConfig
from melter.farm.sweeper import start_deliverer, start_sweeper, stop_deliverer, stop_sweeper

app = make_app()

__all__ = ["app", "tasks"]


@worker_ready.connect
def _start_sweeper(sender: Any = None, **_: Any) -> None:
    celery = getattr(sender, "app", None)
    if celery is None or not isinstance(getattr(celery, "melter_config", None), FarmConfig):
        return
    start_sweeper(celery, getattr(sender, "hostname", "worker"))
    start_deliverer(celery, getattr(sender, "hostname", "worker"))


@worker_process_init.connect
def _warm_up(**_: Any) -> None:
    """Import the render stack in each new pool process, not in its first job's time."""
    import melter.render  # noqa: F401


@worker_shutdown.connect
def _stop_sweeper(**_: Any) -> None:
    stop_sweeper()
    stop_deliverer()
