"""``melter serve`` and ``melter watch`` (mounted as top-level ``melter`` commands)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from melter.errors import MelterError
from melter.extras import require

service_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _settings():  # type: ignore[no-untyped-def]
    import redis  # here, not at the top: every `melter` command would pay for loading it

    from melter.farm.config import require_broker
    from melter.serve.config import load_settings

    settings = load_settings()
    url = require_broker(settings.farm)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=5).ping()
    except redis.RedisError as exc:
        raise MelterError(f"Redis at {url} (MELTER_BROKER_URL) does not answer: {exc}") from None
    return settings


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@service_app.command()
def serve(
    host: Annotated[str, typer.Option("--host", envvar="MELTER_SERVE_HOST",
                                      help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", envvar="MELTER_SERVE_PORT",
                                      help="port to listen on")] = 8080,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """The service: Janus events (POST /janus/events), the jobs API, /metrics, /docs."""
    require("serve", "`melter serve`")
    import uvicorn

    from melter.serve.api import create_app
    from melter.serve.config import require_janus_auth

    settings = _settings()
    require_janus_auth(settings.service, host)
    _logging(log_level)
    if not settings.service.janus_auth:
        logging.getLogger("melter.serve").warning(
            "POST /janus/events takes events from anyone who reaches %s: set "
            "MELTER_JANUS_USER and MELTER_JANUS_PASSWORD", host)
    if not settings.service.api_token:
        logging.getLogger("melter.serve").warning(
            "MELTER_API_TOKEN is not set: the jobs API answers 503 until it is")
    if not settings.recordings.is_dir():
        logging.getLogger("melter.serve").warning(
            "recordings folder %s does not exist (MELTER_RECORDINGS_DIR)", settings.recordings)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level,
                access_log=log_level == "debug")


@service_app.command()
def watch(
    folder: Annotated[Path, typer.Argument(help="folder Janus records into, under "
                                           "MELTER_STORAGE_ROOT")],
    quiet_seconds: Annotated[float, typer.Option(
        "--quiet-seconds", envvar="MELTER_WATCH_QUIET_SECONDS", min=0,
        help="render a room when its files have not grown for this long")] = 60.0,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Render each room once its MJR files stop growing (for setups without events)."""
    require("farm", "`melter watch`")
    from melter.farm.jobs import Farm
    from melter.serve.watch import Watcher

    settings = _settings()
    _logging(log_level)
    if not folder.is_dir():
        raise MelterError(f"{folder}: not a folder")
    Watcher(settings, Farm(settings.farm), folder, quiet_seconds).run()
