"""The farm's commands: ``submit``, ``status``, ``jobs``, ``cancel``, ``retry``, ``worker``,
``flower`` (mounted as top-level ``melter`` commands; also ``python -m melter.farm``).

Errors are :class:`~melter.errors.MelterError` (one line, exit code 1, from the caller's
handler). ``submit`` prints the job id alone on stdout; everything else meant for people goes
to stderr or is a table.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from melter.errors import MelterError
from melter.extras import missing_module_message, require

if TYPE_CHECKING:
    from melter.farm.jobs import Farm

farm_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Melter's render farm (Redis + Celery).",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _need_farm(command: str, *also: str) -> None:
    """Stop with the ``pip install`` line when the farm extra is missing."""
    require("farm", f"`melter {command}`", *also)


def _farm() -> Farm:
    from melter.farm.jobs import farm_for

    return farm_for()


def _absolute(value: str) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else Path.cwd() / path)


@farm_app.command()
def submit(
    inputs: Annotated[list[str], typer.Argument(help="meeting folder or MJR files, under "
                                                "MELTER_STORAGE_ROOT")],
    output: Annotated[list[str], typer.Option("-o", "--output", help="output file; repeat for "
                                              "several renditions")],
    layout: Annotated[str, typer.Option("--layout", "-l", help="built-in layout name or a "
                                        "layout YAML file")] = "grid",
    preset: Annotated[list[str] | None, typer.Option("--preset", "-p", help="preset per "
                      "output, in order; default from the extension")] = None,
    priority: Annotated[str, typer.Option("--priority", help="manual (taken first) or auto")]
    = "auto",
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key", help="a second "
                               "submit with this key returns the first job")] = None,
    callback_url: Annotated[str | None, typer.Option("--callback-url", help="POSTed the job's "
                            "state as JSON on every change")] = None,
    meta: Annotated[list[str] | None, typer.Option("--meta", help="KEY=VALUE metadata; "
                    "repeatable")] = None,
    room: Annotated[str | None, typer.Option("--room", help="pick one room")] = None,
    trim: Annotated[bool, typer.Option("--trim", help="drop stretches where nobody is "
                                       "present")] = False,
    chunk_seconds: Annotated[float | None, typer.Option("--chunk-seconds", help="video chunk "
                             "length for long meetings (0: render in one piece)")] = None,
    max_attempts: Annotated[int | None, typer.Option("--max-attempts")] = None,
) -> None:
    """Queue a render on the farm; prints the job id."""
    _need_farm("submit")
    from melter.farm.job import Priority

    if priority not in tuple(Priority):
        raise typer.BadParameter(" or ".join(sorted(Priority)), param_hint="--priority")
    presets = preset or []
    if presets and len(presets) != len(output):
        raise typer.BadParameter("give one --preset per --output, or none", param_hint="--preset")
    metadata: dict[str, str] = {}
    for item in meta or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--meta")
        metadata[key] = value
    layout_value: str | dict[str, Any] = layout
    layout_path = Path(layout)
    if layout_path.suffix in (".yaml", ".yml") or layout_path.is_file():
        import yaml

        try:
            layout_value = yaml.safe_load(layout_path.read_text())
        except OSError as exc:
            raise MelterError(f"{layout}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise MelterError(f"{layout}: not valid YAML ({exc})") from None
        if not isinstance(layout_value, dict):
            raise MelterError(f"{layout}: not a layout document")
    spec = {
        "inputs": [_absolute(i) for i in inputs],
        "layout": layout_value,
        "outputs": [{"path": _absolute(o), "preset": presets[i] if presets else None}
                    for i, o in enumerate(output)],
        "priority": priority,
        "idempotency_key": idempotency_key,
        "callback_url": callback_url,
        "metadata": metadata,
        "room": room,
        "trim": trim,
        "chunk_seconds": chunk_seconds,
        "max_attempts": max_attempts,
    }
    job_id = _farm().submit(spec)
    sys.stdout.write(job_id + "\n")


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _summary(info: dict[str, Any]) -> None:
    table = Table(show_header=False, title=f"job {info['id']}", title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("state", info["state"] + (f" ({info['stage']})"
                                            if info["stage"] != info["state"] else ""))
    table.add_row("progress", f"{info['progress']:.1f} %  ETA {_eta(info['eta_s'])}")
    table.add_row("attempts", f"{info['attempts']} of at most {info['max_attempts']}"
                  + (f"; lost workers: {', '.join(info['lost_workers'])}"
                     if info["lost_workers"] else ""))
    table.add_row("worker", info["worker"] or "-")
    table.add_row("priority", info["priority"] or "-")
    if info["chunks"]:
        table.add_row("chunks", str(info["chunks"]))
    timings = info["timings"]
    table.add_row("submitted", timings["submitted"] or "-")
    if timings["started"]:
        table.add_row("started", f"{timings['started']} (queued {timings['queued_s']} s)")
    if timings["finished"]:
        table.add_row("finished", f"{timings['finished']} (total {timings['total_s']} s)")
    for path in info["outputs"]:
        table.add_row("output", path)
    if info["error"]:
        table.add_row("error", info["error"])
    out.print(table)


def _watch(job_id: str) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn

    from melter.farm.job import TERMINAL

    farm = _farm()
    info = farm.status(job_id)
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.percentage:>5.1f}%"), TextColumn("ETA {task.fields[eta]}"))
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(info["stage"], total=100, eta=_eta(info["eta_s"]))
        while True:
            bar.update(task, completed=info["progress"], description=f"{info['state']}: "
                       f"{info['stage']}", eta=_eta(info["eta_s"]))
            if info["state"] in TERMINAL:
                break
            time.sleep(0.5)
            info = farm.status(job_id)
    return info


@farm_app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="job id")],
    watch: Annotated[bool, typer.Option("--watch", "-w", help="follow the job until it ends "
                                        "(progress bar: stage, %, ETA)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the state as JSON")] = False,
) -> None:
    """A job's state, progress, attempts and outputs."""
    _need_farm("status")
    info = _watch(job_id) if watch else _farm().status(job_id)
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        _summary(info)
    if watch:
        from melter.farm.job import JobState

        if info["state"] != JobState.DONE:
            raise typer.Exit(1)


@farm_app.command()
def jobs(
    state: Annotated[str | None, typer.Option("--state", help="only jobs in this state")]
    = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="newest first, at most this "
                                       "many")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
) -> None:
    """The farm's jobs, newest first."""
    _need_farm("jobs")
    found = _farm().jobs(limit, state)
    if as_json:
        for info in found:
            sys.stdout.write(json.dumps({k: v for k, v in info.items() if k != "spec"}) + "\n")
        return
    table = Table(title_justify="left")
    table.add_column("id", no_wrap=True, min_width=16)
    table.add_column("state", no_wrap=True)
    table.add_column("%", no_wrap=True, justify="right")
    table.add_column("priority", no_wrap=True)
    table.add_column("tries", no_wrap=True, justify="right")
    table.add_column("submitted", no_wrap=True)
    table.add_column("worker")
    table.add_column("output")
    for info in found:
        submitted = (info["timings"]["submitted"] or "")[5:16].replace("T", " ")
        outputs = [Path(p).name for p in info["outputs"]]
        table.add_row(info["id"], info["state"], f"{info['progress']:.0f}",
                      info["priority"] or "", str(info["attempts"]), submitted,
                      info["worker"] or "", ", ".join(outputs))
    out.print(table)


@farm_app.command()
def cancel(job_id: Annotated[str, typer.Argument(help="job id")]) -> None:
    """Cancel a job: queued work is dropped, running melt processes are killed."""
    _need_farm("cancel")
    state = _farm().cancel(job_id)
    if state == "cancelled":
        err.print(f"{job_id}: cancelled")
        return
    if state == "committing":
        raise MelterError(f"job {job_id} is writing its output; too late to cancel")
    raise MelterError(f"job {job_id} {state}")


@farm_app.command()
def retry(job_id: Annotated[str, typer.Argument(help="job id")]) -> None:
    """Run a failed or cancelled job again; render a done job again as a new version (prints
    the id of the job that runs)."""
    _need_farm("retry")
    sys.stdout.write(_farm().retry(job_id) + "\n")


@farm_app.command()
def worker(
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="renders at once "
                                             "(pool processes)")] = 1,
    queues: Annotated[str, typer.Option("--queues", "-Q", help="queues, in the order they are "
                                        "read")] = "manual,auto,live",
    hostname: Annotated[str | None, typer.Option("--hostname", "-n", help="worker name")]
    = None,
    loglevel: Annotated[str, typer.Option("--loglevel", help="debug, info, warning, "
                                          "error")] = "info",
) -> None:
    """Run a farm worker (Celery, prefork pool); SIGTERM is a warm shutdown that lets running
    renders finish."""
    _need_farm("worker")
    from melter.farm.config import require_broker
    from melter.farm.worker import app

    config = app.melter_config
    require_broker(config)
    names = ",".join(config.queue(q.strip()) for q in queues.split(",") if q.strip())
    argv = ["worker", f"--concurrency={concurrency}", f"--queues={names}",
            f"--loglevel={loglevel}", "--pool=prefork", "--task-events", "--without-gossip",
            "--without-mingle", f"--hostname={hostname or f'melter-{os.getpid()}@%h'}"]
    app.worker_main(argv)


@farm_app.command()
def healthcheck(
    file: Annotated[Path | None, typer.Option("--file", help="the worker's health file "
                                              "(default: MELTER_HEALTH_FILE)")] = None,
    max_age: Annotated[float | None, typer.Option("--max-age", help="seconds; default three "
                                                  "health intervals")] = None,
) -> None:
    """Exit 0 while the local worker's event loop runs (its health file is fresh), else 1;
    no broker round trip."""
    _need_farm("healthcheck")
    from melter.farm.config import load_config
    from melter.farm.health import check

    config = load_config()
    path = file or config.health_file
    if path is None:
        raise MelterError("no health file: set MELTER_HEALTH_FILE (the worker touches it)")
    limit = max_age if max_age is not None else 3 * config.health_interval
    seconds = check(path, limit)
    err.print(f"healthy: {path} touched {seconds:.1f} s ago")


@farm_app.command()
def flower(
    port: Annotated[int, typer.Option("--port", help="HTTP port")] = 5555,
    address: Annotated[str, typer.Option("--address", help="address to listen on")]
    = "127.0.0.1",
    no_auth: Annotated[bool, typer.Option("--no-auth", help="run without a password (anyone "
                                          "who reaches it can revoke tasks and stop "
                                          "workers)")] = False,
) -> None:
    """Flower, the Celery dashboard, on Melter's app, behind basic auth
    (MELTER_FLOWER_USER / MELTER_FLOWER_PASSWORD)."""
    _need_farm("flower", "flower")
    from melter.farm.config import load_config, require_broker

    config = load_config()
    require_broker(config)
    env = dict(os.environ)
    env.pop("FLOWER_BASIC_AUTH", None)
    if not no_auth:
        if not config.flower_password:
            raise MelterError("Flower needs a password: set MELTER_FLOWER_PASSWORD (and "
                              "MELTER_FLOWER_USER, default 'melter'), or pass --no-auth")
        if ":" in config.flower_user:
            raise MelterError("MELTER_FLOWER_USER cannot contain ':'")
        # Through the environment, not the command line, where `ps` would show it.
        env["FLOWER_BASIC_AUTH"] = f"{config.flower_user}:{config.flower_password}"
    command = [sys.executable, "-m", "celery", "-A", "melter.farm.worker", "flower",
               f"--port={port}", f"--address={address}"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, env)


def main() -> None:
    """``python -m melter.farm``: the same error handling as the ``melter`` command."""
    try:
        farm_app()
    except MelterError as exc:
        sys.stderr.write(f"melter: error: {' '.join(str(exc).split())}\n")
        sys.exit(1)
    except ModuleNotFoundError as exc:
        message = missing_module_message(exc)
        if message is None:
            raise
        sys.stderr.write(f"melter: error: {message}\n")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write("melter: error: interrupted\n")
        sys.exit(130)
