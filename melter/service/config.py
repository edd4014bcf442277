"""The service's settings: the ``[service]`` table of the farm's TOML file, under environment
variables.

The file is the farm's (``MELTER_CONFIG``); the service reads its ``[service]`` table, where
rooms map to a layout and outputs::

    [service]
    grace_seconds = 120
    [service.default]                 # rooms not listed below
    layout = "grid"
    outputs = [{ name = "room-{room}-{start}.mp4" }]
    [service.rooms."1234"]
    layout = "speaker"
    outputs = [{ name = "board-{room}-{start}.mp4" }, { name = "board-{room}-{start}.m4a" }]
    callback_url = "https://example.org/melter-hook"

Output names are relative to ``renders_dir`` (``{room}``, ``{start}``: the meeting's start as
``20260101T120000Z``, ``{meeting}``: the meeting's id). The environment wins over the file:
``MELTER_RECORDINGS_DIR``, ``MELTER_RENDERS_DIR``, ``MELTER_API_TOKEN``, ``MELTER_JANUS_USER``,
``MELTER_JANUS_PASSWORD``, ``MELTER_GRACE_SECONDS``, ``MELTER_TICK_SECONDS``,
``MELTER_SETTLE_SECONDS``,
``MELTER_DEFAULT_LAYOUT``, ``MELTER_AUTO_CALLBACK_URL``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from melter.errors import MelterError, validation_problems
from melter.farm.config import DEFAULT_FILE, FarmConfig, environment_value, load_config


class OutputRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("room-{room}-{start}.mp4", min_length=1,
                      description="file name under renders_dir; {room}, {start}, {meeting}")
    preset: str | None = None


class RoomRule(BaseModel):
    """What an automatic render of a room makes."""

    model_config = ConfigDict(extra="forbid")

    layout: str | dict[str, Any] = "grid"
    outputs: list[OutputRule] = Field(default_factory=lambda: [OutputRule()], min_length=1)
    callback_url: str | None = None


class ServiceConfig(BaseModel):
    """Settings of ``melter serve`` and ``melter watch``."""

    model_config = ConfigDict(extra="forbid")

    recordings_dir: Path | None = Field(
        None, description="where Janus records (default: <storage root>/recordings)")
    renders_dir: Path | None = Field(
        None, description="where automatic renders go (default: <storage root>/renders)")
    api_token: str | None = Field(None, description="bearer token of the jobs API")
    janus_user: str | None = Field(None, description="basic auth of POST /janus/events")
    janus_password: str | None = None
    grace_seconds: float = Field(
        60.0, ge=0, description="a room nobody publishes in is rendered after this")
    tick_seconds: float = Field(1.0, gt=0, description="how often grace periods are checked")
    settle_seconds: float = Field(
        2.0, ge=0, description="a meeting's render is submitted this long after it ended, so "
        "Janus has closed its recordings")
    default: RoomRule = Field(default_factory=RoomRule)
    rooms: dict[str, RoomRule] = Field(default_factory=dict)

    def rule(self, room: str) -> RoomRule:
        return self.rooms.get(str(room), self.default)


@dataclass(frozen=True)
class Settings:
    farm: FarmConfig
    service: ServiceConfig

    @property
    def recordings(self) -> Path:
        return self.service.recordings_dir or self.farm.storage_root / "recordings"

    @property
    def renders(self) -> Path:
        return self.service.renders_dir or self.farm.outputs_root / "renders"


_ENV = {
    "MELTER_RECORDINGS_DIR": "recordings_dir",
    "MELTER_RENDERS_DIR": "renders_dir",
    "MELTER_API_TOKEN": "api_token",
    "MELTER_JANUS_USER": "janus_user",
    "MELTER_JANUS_PASSWORD": "janus_password",
    "MELTER_GRACE_SECONDS": "grace_seconds",
    "MELTER_TICK_SECONDS": "tick_seconds",
    "MELTER_SETTLE_SECONDS": "settle_seconds",
}


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """The farm's and the service's settings from the environment and the file."""
    env = dict(os.environ if environ is None else environ)
    farm = load_config(env)
    file = Path(env["MELTER_CONFIG"]) if env.get("MELTER_CONFIG") else (
        DEFAULT_FILE if DEFAULT_FILE.exists() else None)
    data: dict[str, Any] = {}
    if file is not None:  # load_config has read it already: errors are reported there
        table = tomllib.loads(file.read_text()).get("service", {})
        if not isinstance(table, dict):
            raise MelterError(f"{file}: [service] must be a table")
        data = dict(table)
    for variable, name in _ENV.items():
        value = environment_value(env, variable)  # or <variable>_FILE, a Docker secret
        if value is not None:
            data[name] = value
    default = dict(data.get("default") or {})
    if env.get("MELTER_DEFAULT_LAYOUT"):
        default["layout"] = env["MELTER_DEFAULT_LAYOUT"]
    if env.get("MELTER_AUTO_CALLBACK_URL"):
        default["callback_url"] = env["MELTER_AUTO_CALLBACK_URL"]
    data["default"] = default
    try:
        service = ServiceConfig.model_validate(data)
    except ValidationError as exc:
        raise MelterError(
            f"service configuration: {validation_problems(exc, 'service')}") from None
    return Settings(farm, service)
