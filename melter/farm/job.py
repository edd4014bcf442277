"""What a farm job asks for: a pydantic model with a published JSON Schema.

Paths are checked against the storage root (inputs) and the output root (outputs) after
resolving symbolic links and ``..``, so a job cannot read or write elsewhere on the workers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from melter.errors import MelterError, validation_problems


class Priority(StrEnum):
    """A job's priority, in the order workers read their queues: a manual job (a re-render
    someone waits for) is taken before any automatic one, and the render of a meeting that has
    ended before any prerender of a meeting still going on (whose chunks can wait)."""

    MANUAL = "manual"
    AUTO = "auto"
    LIVE = "live"


class JobState(StrEnum):
    """A job's ``state`` in Redis."""

    QUEUED = "queued"
    RUNNING = "running"
    JOINING = "joining"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: States a job does not leave by itself (only ``retry`` takes a failed or cancelled job back).
TERMINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})


class UnitState(StrEnum):
    """A unit's ``state`` in Redis: a join waits for its parts; a unit being committed cannot
    be cancelled."""

    WAITING = "waiting"
    QUEUED = "queued"
    RUNNING = "running"
    COMMITTING = "committing"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class UnitKind(StrEnum):
    """What a unit does, read from its name: ``main`` plans the job (and renders a short one
    whole); the others are ``<kind><output>`` (``r0``, ``j0``) or, for a chunk's video and
    audio, ``<kind><output>.<chunk>`` (``v0.3``, ``a0.3``)."""

    MAIN = "main"
    RENDER = "r"
    VIDEO = "v"
    AUDIO = "a"
    JOIN = "j"

    @classmethod
    def of(cls, unit: str) -> UnitKind:
        """The kind of the unit named ``unit`` (ValueError for a name of no kind)."""
        return cls.MAIN if unit == cls.MAIN else cls(unit[:1])

    def unit(self, output: int = 0, chunk: int | None = None) -> str:
        """The name of this kind's unit for ``output`` (and ``chunk``, for a chunk's video or
        audio)."""
        if self is UnitKind.MAIN:
            return self.value
        return f"{self.value}{output}" if chunk is None else f"{self.value}{output}.{chunk}"

    @property
    def commits_outputs(self) -> bool:
        """Its commit writes final outputs (a job cannot be cancelled while one commits)."""
        return self in (UnitKind.MAIN, UnitKind.RENDER, UnitKind.JOIN)


def unit_output(unit: str) -> int:
    """The output index of a unit other than main (``r2``, ``a2``, ``j2``, ``v2.5``: 2)."""
    return int(unit[1:].partition(".")[0])


def chunk_place(unit: str) -> tuple[int, int]:
    """The output and chunk indices of a chunk's unit (``v2.5``, ``a2.5``: 2 and 5)."""
    output, _, chunk = unit[1:].partition(".")
    return int(output), int(chunk)


def _lua_table(name: str, fields: dict[str, str]) -> str:
    """``local name = {key = value, ...}`` (keys and values are Lua already)."""
    return f"local {name} = {{{', '.join(f'{k} = {v}' for k, v in fields.items())}}}\n"


def _lua_names(name: str, members: type[StrEnum]) -> str:
    return _lua_table(name, {m.name: json.dumps(m.value) for m in members})


def _lua_set(name: str, values: list[str]) -> str:
    return _lua_table(name, {f"[{json.dumps(v)}]": "true" for v in values})


#: The enums as Lua tables, put before every script of :mod:`melter.farm.store`: the scripts
#: name states and kinds through them, so Lua holds no second list of either.
LUA_CONSTANTS = (
    _lua_names("JOB", JobState)
    + _lua_names("UNIT", UnitState)
    + _lua_names("KIND", UnitKind)
    + _lua_set("TERMINAL", sorted(TERMINAL))
    + _lua_set("COMMITS", [k.value for k in UnitKind if k.commits_outputs])
    + "local function kind_of(unit)\n"
    "  if unit == KIND.MAIN then return KIND.MAIN end\n"
    "  return string.sub(unit, 1, 1)\n"
    "end\n"
)


class JobError(MelterError):
    """A job that cannot be accepted (bad paths, layout or preset)."""


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., min_length=1, description="output file, under the output root")
    preset: str | None = Field(
        None, description="mp4, 720p, 1080p, 4k, webm, m4a, opus, wav, hls (an .m3u8 playlist); "
        "default from the extension")


class JobSpec(BaseModel):
    """A render job as submitted."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(
        ..., min_length=1, description="a meeting folder, or MJR files, under the storage root")
    layout: str | dict[str, Any] = Field(
        "grid", description="a built-in layout's name, or a layout document (as in a YAML file)")
    outputs: list[OutputSpec] = Field(..., min_length=1)
    priority: Priority = Field(
        Priority.AUTO, description="manual (re-renders someone waits for) is taken before auto")
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
    prerender: bool = Field(
        False, description="render only the chunks the recordings (still being written) "
        "already hold for good, and keep them for the render of the finished meeting; "
        "writes no output")

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

