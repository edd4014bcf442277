"""A worker's liveness as a file's age, for container health checks.

A Docker health check runs every few seconds on every worker; one that asked the broker would
add load to Redis in proportion to the farm's size and would call every worker unhealthy when
Redis is briefly away (Swarm then restarts them all, killing their renders). Instead the worker
touches ``health_file`` from a timer of its own event loop: the file stays fresh exactly while
that loop turns, which is what stops when a worker hangs. ``melter healthcheck`` compares the
file's age with a limit and exits 0 or 1.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import bootsteps

from melter.errors import MelterError


def touch(path: Path) -> None:
    """Set ``path``'s modification time to now, creating it (and its folder) if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    os.utime(path)


class HealthFile(bootsteps.StartStopStep):
    """Consumer step: touch the configured file every ``health_interval`` seconds."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def start(self, parent: Any) -> None:
        config = parent.app.melter_config
        path = Path(config.health_file)
        touch(path)
        self.tref = parent.timer.call_repeatedly(config.health_interval, touch, (path,))

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    shutdown = stop


def age(path: Path, now: float | None = None) -> float:
    """Seconds since ``path`` was last touched; :class:`MelterError` when it does not exist."""
    try:
        modified = path.stat().st_mtime
    except FileNotFoundError:
        raise MelterError(f"unhealthy: {path} does not exist (worker not started)") from None
    except OSError as exc:
        raise MelterError(f"unhealthy: {path}: {exc.strerror or exc}") from None
    return max(0.0, (time.time() if now is None else now) - modified)


def check(path: Path, max_age: float) -> float:
    """The file's age if it is at most ``max_age`` seconds, else :class:`MelterError`."""
    seconds = age(path)
    if seconds > max_age:
        raise MelterError(f"unhealthy: {path} last touched {seconds:.1f} s ago "
                          f"(limit {max_age:g} s): the worker's event loop is not running")
    return seconds
