"""What a farm job asks for: a pydantic model with a published JSON Schema.

Paths are checked against the storage root (inputs) and the output root (outputs) after
resolving symbolic links and ``..``, so a job cannot read or write elsewhere on the workers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from melter.errors import MelterError, validation_problems

Priority = Literal["auto", "manual"]


class JobError(MelterError):
    """A job that cannot be accepted (bad paths, layout or preset)."""


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., min_length=1, description="output file, under the output root")
    preset: str | None = Field(
        None, description="mp4, 720p, 1080p, 4k, webm, m4a, opus; default from the extension")


class StandIn(BaseModel):
    """A renderer of fixed cost instead of melt, to measure the farm itself (benchmarks)."""

    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(..., ge=0, le=3600)
    busy: bool = Field(False, description="burn this much CPU time instead of sleeping")


class JobSpec(BaseModel):
    """A render job as submitted."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(
        ..., min_length=1, description="a meeting folder, or MJR files, under the storage root")
    layout: str | dict[str, Any] = Field(
        "grid", description="a built-in layout's name, or a layout document (as in a YAML file)")
    outputs: list[OutputSpec] = Field(..., min_length=1)
    priority: Priority = Field(
        "auto", description="manual (re-renders someone waits for) is taken before auto")
    callback_url: str | None = Field(
        None, description="POSTed the job's state as JSON (signed) on every change of state")
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=200,
        description="submitting again with the same key returns the first job")
    metadata: dict[str, Any] = Field(default_factory=dict)
    room: str | None = Field(None, description="pick one room among the inputs' recordings")
    trim: bool = Field(False, description="drop stretches where nobody is present")
    chunk_seconds: float | None = Field(
        None, ge=0, description="video chunk length for long meetings (0: one piece; "
        "default: the farm's setting)")
    max_attempts: int | None = Field(None, ge=1, le=20)
    stand_in: StandIn | None = Field(
        None, description="benchmarks only: a fixed-cost stand-in instead of melt")

    @field_validator("callback_url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("callback_url must be an http:// or https:// URL")
        return value

    @field_validator("metadata")
    @classmethod
    def _json(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata must be JSON ({exc})") from None
        return value


def job_schema() -> dict[str, Any]:
    """The JSON Schema of a job document."""
    return JobSpec.model_json_schema()


def parse_job(data: object) -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise JobError(f"invalid job: {validation_problems(exc, 'job')}") from None


def under_root(value: str | Path, root: Path, what: str, variable: str,
               label: str = "the storage root") -> Path:
    """``value`` (relative to ``root``, or absolute) resolved; refused outside ``root``."""
    base = root.resolve()
    path = Path(value)
    if not path.is_absolute():
        path = base / path
    resolved = Path(os.path.realpath(path))
    if resolved == base or not resolved.is_relative_to(base):
        raise JobError(f"{what} {value} is outside {label} {base} ({variable}); the farm only "
                       "reads and writes under it")
    return resolved


def iso(seconds: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC, to the millisecond (None stays None)."""
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC).isoformat(timespec="milliseconds")

