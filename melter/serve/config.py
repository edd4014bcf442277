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
``MELTER_JANUS_PASSWORD``, ``MELTER_JANUS_TOKEN``, ``MELTER_GRACE_SECONDS``,
``MELTER_TICK_SECONDS``, ``MELTER_SETTLE_SECONDS``, ``MELTER_DEFAULT_LAYOUT``,
``MELTER_AUTO_CALLBACK_URL``, the limits of ``POST /janus/events`` (``MELTER_JANUS_MAX_*``,
``MELTER_JANUS_RATE_*``, ``MELTER_JANUS_CLOCK_SKEW_SECONDS``) ``MELTER_ROOM_TTL_SECONDS``,
``MELTER_IDLE_ROOM_TTL_SECONDS`` and ``MELTER_MAX_ROOMS``.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    janus_token: str | None = Field(
        None, description="bearer token POST /janus/events also takes (for a proxy in front "
        "of Janus); Janus's sample event handler itself sends basic auth only")
    max_body_bytes: int = Field(
        1_000_000, ge=1024, description="largest POST /janus/events body as sent (413 above)")
    max_inflated_bytes: int = Field(
        4_000_000, ge=1024, description="largest body once inflated (compress = true); "
        "inflating stops there (413)")
    max_events: int = Field(1000, ge=1, description="most events in one POST (413 above)")
    max_json_depth: int = Field(
        32, ge=8, le=500, description="deepest JSON nesting taken (Janus's events are 5 deep)")
    clock_skew_seconds: float = Field(
        86400.0, gt=0, description="events whose timestamp is further than this from the "
        "service's clock are dropped: one such event could end or freeze a room for good")
    room_ttl_seconds: float = Field(
        172800.0, ge=3600, description="a room's state in Redis expires after this long "
        "without an event (longer than any meeting plus its grace period)")
    idle_room_ttl_seconds: float = Field(
        600.0, ge=10, description="a room with nothing to keep (nobody publishing, no render "
        "pending or submitted) expires after this long without an event")
    max_rooms: int = Field(
        20000, ge=10, description="most rooms followed at once; beyond it, idle rooms are "
        "forgotten oldest first, and events of new rooms are dropped (counted) if none is idle")
    rate_limit: float = Field(
        200.0, ge=0, description="POST /janus/events per second per client address, "
        "sustained (0: no limit); above it, 429")
    rate_burst: int = Field(2000, ge=1, description="POSTs a client may send at once "
                            "before rate_limit applies")
    grace_seconds: float = Field(
        60.0, ge=0, description="a room nobody publishes in is rendered after this")
    tick_seconds: float = Field(1.0, gt=0, description="how often grace periods are checked")
    settle_seconds: float = Field(
        2.0, ge=0, description="a meeting's render is submitted this long after it ended, so "
        "Janus has closed its recordings")
    prerender_seconds: float = Field(
        20.0, ge=0, description="while a meeting goes on, the chunks its recordings hold for "
        "good are rendered this often (a prerender job), so that only the rest is left when it "
        "ends (0: never)")
    chunk_seconds: float = Field(
        12.0, ge=0, description="with prerenders, automatic renders are cut into chunks of "
        "about this length (0: the farm's MELTER_CHUNK_SECONDS); a meeting's prerenders and "
        "its render share them, so short ones keep a live playlist close behind the meeting "
        "and leave little to render when it ends")
    default: RoomRule = Field(default_factory=RoomRule)
    rooms: dict[str, RoomRule] = Field(default_factory=dict)

    def rule(self, room: str) -> RoomRule:
        return self.rooms.get(str(room), self.default)

    @model_validator(mode="after")
    def _credentials_in_pairs(self) -> ServiceConfig:
        """A user without a password would let anyone in who guesses the user's name."""
        if bool(self.janus_user) != bool(self.janus_password):
            raise ValueError("set both MELTER_JANUS_USER and MELTER_JANUS_PASSWORD (Janus's "
                             "backend_user and backend_pwd), or neither")
        return self

    @property
    def janus_auth(self) -> bool:
        """Whether POST /janus/events asks for credentials."""
        return bool(self.janus_user or self.janus_token)


def loopback(host: str) -> bool:
    """Whether listening on ``host`` reaches this machine only."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: whatever it resolves to, it may not stay loopback


def require_janus_auth(service: ServiceConfig, host: str) -> None:
    """Refuse to listen beyond loopback with an open event endpoint: whoever can post Janus
    events can end meetings and queue renders."""
    if not service.janus_auth and not loopback(host):
        raise MelterError(
            f"melter serve --host {host}: POST /janus/events would take events from anyone; "
            "set MELTER_JANUS_USER and MELTER_JANUS_PASSWORD (Janus's backend_user and "
            "backend_pwd) or MELTER_JANUS_TOKEN, or listen on 127.0.0.1")


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
    "MELTER_JANUS_TOKEN": "janus_token",
    "MELTER_JANUS_MAX_BODY_BYTES": "max_body_bytes",
    "MELTER_JANUS_MAX_INFLATED_BYTES": "max_inflated_bytes",
    "MELTER_JANUS_MAX_EVENTS": "max_events",
    "MELTER_JANUS_MAX_JSON_DEPTH": "max_json_depth",
    "MELTER_JANUS_CLOCK_SKEW_SECONDS": "clock_skew_seconds",
    "MELTER_ROOM_TTL_SECONDS": "room_ttl_seconds",
    "MELTER_IDLE_ROOM_TTL_SECONDS": "idle_room_ttl_seconds",
    "MELTER_MAX_ROOMS": "max_rooms",
    "MELTER_JANUS_RATE_LIMIT": "rate_limit",
    "MELTER_JANUS_RATE_BURST": "rate_burst",
    "MELTER_GRACE_SECONDS": "grace_seconds",
    "MELTER_TICK_SECONDS": "tick_seconds",
    "MELTER_SETTLE_SECONDS": "settle_seconds",
    "MELTER_PRERENDER_SECONDS": "prerender_seconds",
    "MELTER_AUTO_CHUNK_SECONDS": "chunk_seconds",
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
