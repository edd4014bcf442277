"""The farm's settings: environment variables, over an optional TOML file, over defaults.

``MELTER_CONFIG`` names the file (else ``/etc/melter/farm.toml`` when it exists); its keys are
the field names below (``broker_url = "redis://…"``). Each field can be set in the environment
as ``MELTER_`` + its name in capitals (``MELTER_BROKER_URL``, ``MELTER_STORAGE_ROOT``, …), which
wins over the file. ``MELTER_<NAME>_FILE`` names a file holding the value instead (its content,
without the trailing newline): Docker secrets are files under ``/run/secrets``, and a password
kept there never shows in ``docker inspect`` or a process's environment.

``redis_password`` (``MELTER_REDIS_PASSWORD_FILE``) is put into ``broker_url`` when that URL
has none, so that the Redis server's ``requirepass`` and every client read the same secret.

Timing fields hang together: the Redis visibility timeout must exceed the hard time limit (a
message still unacknowledged after it is delivered again), the hard limit exceeds the soft one
(the soft one stops melt cleanly), and the lease is much shorter than all of them — it is what
brings a job back within a minute or two when its worker dies, instead of after the visibility
timeout's hours.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from melter.errors import MelterError, validation_problems
from melter.farm.allow import parse_allow

DEFAULT_FILE = Path("/etc/melter/farm.toml")
ENV_PREFIX = "MELTER_"


class FarmConfig(BaseModel):
    """Everything a submitter, a worker and Flower need to agree on."""

    model_config = ConfigDict(extra="forbid")

    broker_url: str | None = Field(
        None, description="Redis URL of the broker and of Melter's job state; unset: no farm")
    storage_root: Path = Field(
        Path("/srv/melter"), description="inputs must lie under this folder (shared by workers)")
    output_root: Path | None = Field(
        None, description="outputs must lie under this folder (default: the storage root)")
    key_prefix: str = Field("melter", min_length=1, description="prefix of Melter's Redis keys")
    queue_prefix: str = Field(
        "", description="prefix of the Celery queue names (farms sharing one Redis database)")
    broker_key_prefix: str = Field(
        "", description="prefix of every key Celery's Redis transport writes (kombu's "
        "global_keyprefix): farms sharing one Redis database")
    lease_seconds: float = Field(
        60.0, gt=0, description="a running attempt's lease; lost when its worker stops renewing")
    heartbeat_seconds: float = Field(
        1.0, gt=0, description="how often a running attempt renews its lease and checks cancel")
    sweep_seconds: float = Field(
        10.0, gt=0, description="how often each worker looks for expired leases and due retries")
    dispatch_grace_seconds: float = Field(
        30.0, gt=0, description="a dispatch not confirmed within this is sent again by a sweeper")
    max_attempts: int = Field(3, ge=1, description="attempts of one unit before the job fails")
    retry_backoff_seconds: float = Field(
        10.0, ge=0, description="delay before a failed attempt's retry (doubles each time)")
    soft_time_limit: float = Field(
        6 * 3600.0, gt=0, description="an attempt is stopped (melt killed) after this")
    hard_time_limit: float = Field(
        6 * 3600.0 + 300, gt=0, description="the worker process is killed after this")
    visibility_timeout: float = Field(
        8 * 3600.0, gt=0, description="Redis transport: unacknowledged messages redelivered after")
    max_memory_per_child: int = Field(
        2_000_000, gt=0, description="KiB; a pool process above it is replaced after its task")
    chunk_seconds: float = Field(
        30.0, ge=0, description="long meetings render in chunks (video and audio units) of "
        "about this length (0: never); a meeting is chunked from twice this length on")
    parts_ttl_hours: float = Field(
        72.0, gt=0, description="chunks kept for a meeting's render (rendered while it went "
        "on) are removed once none was kept beside them for this long: the meeting's render "
        "never came, or was made by another layout")
    cache_dir: Path | None = Field(
        None, description="per-worker cache of prepared media (default: a temporary folder)")
    job_ttl_days: float = Field(
        30.0, gt=0, description="how long finished jobs' state is kept in Redis")
    callback_timeout: float = Field(
        10.0, gt=0, description="seconds one callback delivery may take in all (connecting, "
        "sending, and the receiver's answer, however slowly it trickles in)")
    callback_allow: str | None = Field(
        None, description="comma-separated host names, addresses and CIDR blocks callbacks "
        "may go to; set, any other callback_url is refused at submit (unset: any host)")
    callback_workers: int = Field(
        4, ge=1, le=64, description="callbacks delivered at once by each deliverer (a slow "
        "receiver holds up one of them, not the other jobs' callbacks)")
    callback_secret: str | None = Field(
        None, description="HMAC-SHA256 key signing callbacks (X-Melter-Signature); unset: unsigned")
    callback_attempts: int = Field(
        8, ge=1, description="deliveries of one callback before it is given up")
    callback_backoff_seconds: float = Field(
        2.0, ge=0, description="delay before a failed callback's retry (doubles each time, "
        "at most 10 minutes)")
    flower_user: str = Field("melter", min_length=1)
    flower_password: str | None = None
    redis_password: str | None = Field(
        None, description="put into broker_url when that URL carries no password")
    health_file: Path | None = Field(
        None, description="a worker touches this file while its event loop runs; "
        "`melter healthcheck` reads its age (container health without a broker round trip)")
    health_interval: float = Field(
        5.0, gt=0, description="seconds between two touches of health_file")

    @model_validator(mode="after")
    def _ordered(self) -> FarmConfig:
        if self.hard_time_limit <= self.soft_time_limit:
            raise ValueError("hard_time_limit must exceed soft_time_limit")
        if self.visibility_timeout <= self.hard_time_limit:
            raise ValueError(
                "visibility_timeout must exceed hard_time_limit (else a running job's message "
                "is delivered to a second worker)")
        if self.lease_seconds <= 2 * self.heartbeat_seconds:
            raise ValueError("lease_seconds must be more than twice heartbeat_seconds")
        if self.callback_allow:
            parse_allow(self.callback_allow)
        if self.redis_password and self.broker_url:
            self.broker_url = with_password(self.broker_url, self.redis_password)
        return self

    @property
    def outputs_root(self) -> Path:
        return self.output_root or self.storage_root

    def queue(self, priority: str) -> str:
        return f"{self.queue_prefix}{priority}"


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` in it, unless it already carries one (which then wins)."""
    parts = urlsplit(url)
    if parts.password is not None or not parts.hostname:
        return url
    user = quote(parts.username, safe="") if parts.username else ""
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def environment_value(environ: dict[str, str], key: str) -> str | None:
    """``environ[key]``, or the content of the file named by ``<key>_FILE`` (a Docker secret);
    None when neither is set (an empty value counts as unset)."""
    file_key = key + "_FILE"
    if environ.get(key) and environ.get(file_key):
        raise MelterError(f"set {key} or {file_key}, not both")
    if environ.get(file_key):
        secret = Path(environ[file_key])
        try:
            return secret.read_text().rstrip("\r\n")
        except OSError as exc:
            raise MelterError(f"{file_key}: {secret}: {exc.strerror or exc}") from None
    return environ.get(key) or None


def _from_environment(environ: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in FarmConfig.model_fields:
        value = environment_value(environ, ENV_PREFIX + name.upper())
        if value is not None:
            values[name] = value
    return values


def load_config(environ: dict[str, str] | None = None, path: Path | None = None) -> FarmConfig:
    """The farm's configuration from the environment (and the optional file)."""
    env = dict(os.environ if environ is None else environ)
    file = path or (Path(env["MELTER_CONFIG"]) if env.get("MELTER_CONFIG") else None)
    data: dict[str, Any] = {}
    if file is None and DEFAULT_FILE.exists():
        file = DEFAULT_FILE
    if file is not None:
        try:
            data = tomllib.loads(file.read_text())
        except OSError as exc:
            raise MelterError(f"{file}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise MelterError(f"{file}: not valid TOML ({exc})") from None
    data.pop("service", None)  # the service's own table (melter.serve.config)
    data.update(_from_environment(env))
    try:
        return FarmConfig.model_validate(data)
    except ValidationError as exc:
        raise MelterError(
            f"farm configuration: {validation_problems(exc, 'config')}") from None


def require_broker(config: FarmConfig) -> str:
    if not config.broker_url:
        raise MelterError(
            "no farm configured: set MELTER_BROKER_URL (a Redis URL such as "
            "redis://127.0.0.1:6379/0), or render in-process with `melter render`")
    return config.broker_url
