"""The render farm: jobs queued in Redis, rendered by Celery workers, tracked by Melter.

Python API (the CLI's ``melter submit``/``status``/``jobs``/``cancel``/``retry`` call these)::

    from melter import farm
    job = farm.submit("meetings/1234", layout="grid", outputs=["out/1234.mp4"],
                      priority="manual", idempotency_key="meeting-1234")
    farm.status(job)["state"]      # queued, running, joining, done, failed, cancelled

Configuration comes from the environment (``MELTER_BROKER_URL``, ``MELTER_STORAGE_ROOT``, …;
see :mod:`melter.farm.config`). Paths are relative to the storage root (inputs) and the output
root (outputs), or absolute under them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from melter.farm.config import FarmConfig
    from melter.farm.jobs import Farm


def _farm(config: FarmConfig | None) -> Farm:
    from melter.farm.jobs import Farm, farm_for

    return Farm(config) if config is not None else farm_for()


def submit(
    inputs: str | Path | Sequence[str | Path],
    layout: str | dict[str, Any] = "grid",
    outputs: str | Path | Sequence[str | Path | tuple[str | Path, str | None] | dict[str, Any]]
    = (),
    *,
    priority: str = "auto",
    callback_url: str | None = None,
    idempotency_key: str | None = None,
    metadata: dict[str, Any] | None = None,
    config: FarmConfig | None = None,
    **options: Any,
) -> str:
    """Queue a render; returns the job id. ``outputs``: paths, ``(path, preset)`` pairs or
    ``{"path": ..., "preset": ...}``. Other options: ``room``, ``trim``, ``chunk_seconds``,
    ``max_attempts``."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    targets = [outputs] if isinstance(outputs, (str, Path)) else list(outputs)
    out_specs: list[dict[str, Any]] = []
    for target in targets:
        if isinstance(target, dict):
            out_specs.append(target)
        elif isinstance(target, tuple):
            out_specs.append({"path": str(target[0]), "preset": target[1]})
        else:
            out_specs.append({"path": str(target)})
    spec = {
        "inputs": [str(i) for i in items], "layout": layout, "outputs": out_specs,
        "priority": priority, "callback_url": callback_url, "idempotency_key": idempotency_key,
        "metadata": metadata or {}, **options,
    }
    return _farm(config).submit(spec)


def status(job_id: str, config: FarmConfig | None = None) -> dict[str, Any]:
    return _farm(config).status(job_id)


def jobs(limit: int = 50, state: str | None = None,
         config: FarmConfig | None = None) -> list[dict[str, Any]]:
    return _farm(config).jobs(limit, state)


def cancel(job_id: str, config: FarmConfig | None = None) -> str:
    return _farm(config).cancel(job_id)


def retry(job_id: str, config: FarmConfig | None = None) -> str:
    return _farm(config).retry(job_id)


__all__ = ["cancel", "jobs", "retry", "status", "submit"]
