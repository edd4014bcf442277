"""The ``melter`` command.

Exit codes: 0 success, 1 bad input (the message names the file and, for MJR data, the byte
offset), 2 usage error. Bad input never produces a traceback.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from melter import __version__
from melter.errors import MelterError, mask_secrets

commands = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Turn Janus recordings (MJR files) into playable, in-sync media.",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

EXIT_INPUT = 1


def _iso(microseconds: int) -> str:
    moment = dt.datetime.fromtimestamp(microseconds / 1e6, tz=dt.UTC)
    return moment.isoformat(timespec="milliseconds")


def _report(path: Path) -> dict[str, Any]:
    from melter.track import analyze

    analysis = analyze(path)
    header = analysis.header
    stats = analysis.stats
    report: dict[str, Any] = {
        "file": str(path),
        "header": header.to_json(),
        "kind": analysis.kind,
        "codec": analysis.codec,
        "packets": stats.packets,
        "frames": analysis.frames,
        "invalid_frames": stats.invalid,
        "duplicates": stats.duplicates,
        "reordered": stats.reordered,
        "late_dropped": stats.late,
        "lost": stats.lost,
        "loss_percent": round(analysis.loss_percent, 3),
        "ssrcs": stats.ssrcs,
        "ssrc_changes": stats.ssrc_changes,
        "start_us": analysis.start_us,
        "end_us": analysis.end_us,
        "start": _iso(analysis.start_us),
        "end": _iso(analysis.end_us),
        "duration_s": round(analysis.duration_us / 1e6, 3),
        "start_minus_u_ms": (
            round((analysis.start_us - header.first_packet_us) / 1000, 1)
            if header.first_packet_us
            else None
        ),
        "skew_ppm": round(analysis.skew_ppm, 1),
        "clock_pieces": [
            {"first_packet": p.first_index, "reason": p.reason} for p in analysis.pieces
        ],
        "gaps": [
            g.to_json() | {"start_s": round((g.start_us - analysis.start_us) / 1e6, 3)}
            for g in analysis.gaps
        ],
        "gap_count": analysis.gap_count,
        "warnings": analysis.warnings,
    }
    if analysis.kind == "audio":
        report["media_s"] = round(analysis.media_us / 1e6, 3)
        report["audio_level_extension"] = analysis.audio_level_id
        report["audio_levels_dbov"] = {str(-k): v for k, v in sorted(analysis.levels.items())}
    if analysis.kind == "video":
        report["keyframes"] = len(analysis.keyframes_us)
        report["keyframes_s"] = [
            round((k - analysis.start_us) / 1e6, 3) for k in analysis.keyframes_us[:1000]
        ]
        report["resolutions"] = [
            {"at_s": round((t - analysis.start_us) / 1e6, 3), "width": w, "height": h}
            for t, w, h in analysis.resolutions
        ]
        report["rotations"] = [
            {"at_s": round((t - analysis.start_us) / 1e6, 3), "degrees": d, "flip": f}
            for t, d, f in analysis.rotations
        ]
    return report


def _print_report(report: dict[str, Any], earliest_us: int) -> None:
    table = Table(title=report["file"], show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    header = report["header"]
    table.add_row(
        "format",
        f"{header['variant']} {report['kind']} {report['codec']}"
        + (f" ({header['description']})" if header.get("description") else ""),
    )
    table.add_row(
        "packets",
        f"{report['packets']} ({report['frames']} frames); lost "
        f"{report['lost']} ({report['loss_percent']} %), reordered {report['reordered']},"
        f" duplicates {report['duplicates']}, invalid {report['invalid_frames']}",
    )
    table.add_row("wall clock", f"{report['start']} → {report['end']} ({report['duration_s']} s)")
    table.add_row(
        "offset",
        f"{(report['start_us'] - earliest_us) / 1e6:+.3f} s from the earliest "
        f"track; start − u = {report['start_minus_u_ms']} ms",
    )
    table.add_row("skew", f"{report['skew_ppm']} ppm")
    table.add_row("ssrcs", f"{len(report['ssrcs'])} ({report['ssrc_changes']} changes)")
    if report["gaps"]:
        shown = ", ".join(
            f"{g['start_s']} s +{g['length_ms']} ms {g['cause']}" for g in report["gaps"][:8]
        )
        more = f" (+{report['gap_count'] - 8} more)" if report["gap_count"] > 8 else ""
        table.add_row("gaps", shown + more)
    if report["kind"] == "video":
        table.add_row(
            "keyframes",
            f"{report['keyframes']} at " + ", ".join(str(k) for k in report["keyframes_s"][:10]),
        )
        table.add_row(
            "resolutions",
            ", ".join(f"{r['width']}x{r['height']} @{r['at_s']} s" for r in report["resolutions"]),
        )
        if report["rotations"]:
            table.add_row(
                "rotation",
                ", ".join(
                    f"{r['degrees']}°{' flip' if r['flip'] else ''} @{r['at_s']} s"
                    for r in report["rotations"]
                ),
            )
    if report["kind"] == "audio" and report.get("audio_levels_dbov"):
        levels = report["audio_levels_dbov"]
        loudest = min(int(k) for k in levels) * -1
        table.add_row(
            "audio level",
            f"extension id {report['audio_level_extension']}, "
            f"{len(levels)} distinct levels, loudest -{loudest} dBov",
        )
    for warning in report["warnings"]:
        table.add_row("warning", warning)
    out.print(table)


@commands.command()
def inspect(
    files: Annotated[list[Path], typer.Argument(help="MJR recordings", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Header, timing, gaps, loss, key frames, resolutions and skew of each recording."""
    reports = [_report(path) for path in files]
    if as_json:
        sys.stdout.write(json.dumps(reports if len(reports) > 1 else reports[0], indent=2) + "\n")
        return
    earliest = min(r["start_us"] for r in reports)
    for report in reports:
        _print_report(report, earliest)


@commands.command()
def convert(
    files: Annotated[
        list[Path],
        typer.Argument(help="one recording, or one participant's audio and video recordings"),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "-o",
            "--output",
            help="output file; its extension "
            "picks the format (.opus .ogg .webm .mkv .mp4 .wav "
            ".srt, or any other for raw data)",
        ),
    ],
) -> None:
    """Remux recordings into a playable file without re-encoding (WAV decodes)."""
    from melter.convert import CONTAINERS, DECODED, TEXT, raw_data
    from melter.convert import convert as run_convert
    from melter.mjr.reader import MjrReader

    suffix = output.suffix.lower()
    if suffix not in CONTAINERS and suffix not in DECODED | TEXT:
        if len(files) == 1 and MjrReader(files[0]).header.kind == "data":
            count = raw_data(files[0], output)
            err.print(f"{output}: {count} data messages")
            return
        raise typer.BadParameter(f"unknown output type {suffix!r}", param_hint="--output")
    report = run_convert(files, output)
    for warning in report.warnings:
        _warn(warning)
    written = ", ".join(f"{n} {kind} frames" for kind, n in report.frames_written.items())
    extra = f", {report.silence_ms:.0f} ms of silence filled" if report.silence_ms else ""
    err.print(f"{output}: {written}{extra}, {report.duration_us / 1e6:.3f} s")


def _mount_farm() -> None:
    """The farm's commands (submit, status, jobs, cancel, retry, worker, flower) at top level."""
    from melter.farm.cli import farm_app

    commands.registered_commands.extend(farm_app.registered_commands)


_mount_farm()


def _mount_service() -> None:
    """``serve`` (Janus events, jobs API, metrics) and ``watch`` at top level."""
    from melter.serve.cli import service_app

    commands.registered_commands.extend(service_app.registered_commands)


_mount_service()

swarm_app = typer.Typer(help="Docker Swarm deployment: macvlan address plans and networks.",
                        no_args_is_help=True)
commands.add_typer(swarm_app, name="swarm")


@swarm_app.command("plan")
def swarm_plan(
    inventory: Annotated[Path, typer.Argument(help="inventory YAML: subnet, gateway, network, "
                                              "nodes [{name, parent, slots}]")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Per-node --ip-range blocks holding exactly each node's slots, and the docker commands."""
    from melter.swarm.placement import load_inventory
    from melter.swarm.placement import plan as make_plan

    result = make_plan(load_inventory(str(inventory)))
    if as_json:
        data = {
            "network": result.inventory.network,
            "config_name": result.config_name,
            "nodes": [{"name": b.node, "ip_range": str(b.ip_range), "slots": b.slots,
                       "aux_addresses": [str(a) for a in b.aux],
                       "command": result.node_command(b)} for b in result.blocks],
            "swarm_command": result.swarm_command(),
        }
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    sys.stdout.write(result.script())


@swarm_app.command("apply")
def swarm_apply(
    inventory: Annotated[Path, typer.Argument(help="inventory YAML (as for `swarm plan`)")],
    node_url: Annotated[list[str] | None, typer.Option(
        "--node-url", help="NAME=URL of a node's Docker engine (unix://... or tcp://...); "
        "repeat per node. One-node inventories default to DOCKER_HOST")] = None,
    manager: Annotated[str | None, typer.Option(
        "--manager", help="node whose engine creates the swarm network (default: the first "
        "manager found)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="check the engines and say what "
                                          "would be created; change nothing")] = False,
) -> None:
    """Create the plan's networks: each node's config-only network on its own engine, then the
    swarm macvlan network on a manager. Existing identical networks are left alone."""
    from melter.extras import require

    require("deploy", "`melter swarm apply`")
    from melter.swarm.apply import apply, engine_urls
    from melter.swarm.placement import load_inventory
    from melter.swarm.placement import plan as make_plan

    def report(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    result = make_plan(load_inventory(str(inventory)))
    apply(result, engine_urls(result, node_url or []), manager=manager, dry_run=dry_run,
          report=report)


layouts_app = typer.Typer(help="Built-in layouts and the layout file schema.", no_args_is_help=True)
commands.add_typer(layouts_app, name="layouts")

RoomOption = Annotated[str | None, typer.Option("--room", help="the Janus room, when the folder "
                                                 "holds several")]
EventsOption = Annotated[Path | None, typer.Option("--events", help="Janus events file "
                                                    "(JSON lines) for display names")]
LayoutOption = Annotated[str, typer.Option("--layout", "-l", help="built-in layout name or a "
                                           "layout YAML file")]


@layouts_app.command("list")
def layouts_list() -> None:
    """The built-in layouts."""
    from melter.layout.model import builtin_names, load_layout

    # One unwrapped line per layout, its name first, so scripts can read the list.
    for name in builtin_names():
        description = " ".join(load_layout(name).description.split())
        sys.stdout.write(f"{name:14} {description}\n")


@layouts_app.command("show")
def layouts_show(name: Annotated[str, typer.Argument(help="built-in name or file")]) -> None:
    """A layout as YAML, defaults filled in."""
    import yaml

    from melter.layout.model import load_layout

    layout = load_layout(name)
    data = layout.model_dump(mode="json", by_alias=True, exclude_none=True)
    sys.stdout.write(yaml.safe_dump(data, sort_keys=False))


@layouts_app.command("schema")
def layouts_schema() -> None:
    """The JSON Schema of layout files."""
    from melter.layout.model import schema

    sys.stdout.write(json.dumps(schema(), indent=2) + "\n")


def _meeting(inputs: list[Path], room: str | None, events: Path | None):  # type: ignore[no-untyped-def]
    from melter.meeting import discover

    return discover(inputs, room=room, events=events)


@commands.command()
def plan(
    inputs: Annotated[list[Path], typer.Argument(help="meeting folder or MJR files")],
    layout: LayoutOption = "grid",
    room: RoomOption = None,
    events: EventsOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    speakers: Annotated[bool, typer.Option("--speakers", help="include the active-speaker "
                                           "timeline")] = False,
) -> None:
    """The scene plan: who sits where during which interval (a dry run, no media written)."""
    from melter.layout.model import load_layout
    from melter.render import plan_render

    meeting = _meeting(inputs, room, events)
    planned = plan_render(meeting, load_layout(layout))
    scene_plan, changes = planned.plan, planned.speakers
    data = scene_plan.to_json()
    data["participants"] = [
        {"id": p.id, "display": p.display, "kind": p.kind,
         "segments": [{"id": s.id, "start_s": round((s.start_us - meeting.start_us) / 1e6, 3),
                       "end_s": round((s.end_us - meeting.start_us) / 1e6, 3),
                       "audio": s.audio is not None, "video": s.video is not None}
                      for s in p.segments]}
        for p in meeting.participants
    ]
    if speakers:
        data["speakers"] = [{"at_s": round(c.at_us / 1e6, 3), "participant": c.participant}
                            for c in changes]
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    table = Table(title=f"room {meeting.room} — {data['duration_s']} s, "
                  f"{len(meeting.participants)} participants", title_justify="left")
    for column in ("from", "to", "layout", "placements", "audio"):
        table.add_column(column)
    for scene in data["scenes"]:
        places = "\n".join(
            f"{p['display']} → {p['region']} {p['cell'][2]}x{p['cell'][3]}+{p['cell'][0]}+"
            f"{p['cell'][1]}{'' if p['video'] else ' (card)'}" for p in scene["placements"])
        table.add_row(str(scene["start_s"]), str(scene["end_s"]), scene["layout"], places,
                      str(len(scene["audio"])))
    out.print(table)
    for warning in data["warnings"]:
        _warn(warning)


@commands.command()
def render(
    inputs: Annotated[list[Path], typer.Argument(help="meeting folder or MJR files")],
    output: Annotated[list[Path], typer.Option("-o", "--output", help="output file; repeat for "
                                               "several renditions")],
    layout: LayoutOption = "grid",
    preset: Annotated[list[str] | None, typer.Option("--preset", "-p", help="preset per output, "
                      "in order (mp4, 720p, 1080p, 4k, webm, m4a, opus, wav, hls); default from "
                      "the extension")] = None,
    room: RoomOption = None,
    events: EventsOption = None,
    trim: Annotated[bool, typer.Option("--trim", help="drop stretches where nobody is "
                                       "present")] = False,
    workdir: Annotated[Path | None, typer.Option("--workdir", help="keep prepared media here "
                                                 "(reused by later renders)")] = None,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", min=1, help="windows rendered at "
                                             "once (default: one per core)")] = None,
    window: Annotated[float, typer.Option("--window", min=0, help="seconds per window of a "
                                          "long meeting (0: one melt run for the whole "
                                          "meeting)")] = 60.0,
) -> None:
    """Compose the meeting by a layout into finished video (through MLT's melt).

    A meeting of at least two windows is rendered window by window, several at once, and
    the windows joined without re-encoding: the same file, at a cost per minute that does not
    grow with the meeting.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    _library_warnings()

    from melter.layout.model import load_layout
    from melter.render import RenderOptions, plan_render, preset_for
    from melter.windows import render_meeting

    presets = preset or []
    if presets and len(presets) != len(output):
        raise typer.BadParameter("give one --preset per --output, or none", param_hint="--preset")
    targets = [(path, preset_for(path, presets[i] if presets else None))
               for i, path in enumerate(output)]
    meeting = _meeting(inputs, room, events)
    planned = plan_render(meeting, load_layout(layout), RenderOptions(trim=trim))
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.percentage:>3.0f}%"), TimeRemainingColumn())
    with Progress(*columns,
                  console=err, transient=True) as bar:
        task = bar.add_task("rendering", total=1)

        def progress(frame: int, frames: int) -> None:
            bar.update(task, total=frames, completed=frame)

        result = render_meeting(planned, targets, window_seconds=window, jobs=jobs,
                                workdir=workdir, progress=progress)
    for warning in result.warnings:
        _warn(warning)
    for path in result.outputs:
        err.print(f"{path}: {result.duration_s} s, {len(meeting.participants)} participants")


@commands.command()
def preview(
    inputs: Annotated[list[Path], typer.Argument(help="meeting folder or MJR files")],
    at: Annotated[str, typer.Option("--at", help="meeting time: HH:MM:SS, MM:SS or seconds")],
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG file")],
    layout: LayoutOption = "grid",
    room: RoomOption = None,
    events: EventsOption = None,
    workdir: Annotated[Path | None, typer.Option("--workdir")] = None,
) -> None:
    """One composed frame as a PNG, in seconds."""
    _library_warnings()
    from melter.layout.model import load_layout, parse_time
    from melter.render import STILL, plan_render
    from melter.render import render as run_render

    try:
        seconds = parse_time(at)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--at") from None
    planned = plan_render(_meeting(inputs, room, events), load_layout(layout))
    frame = planned.frame_at(seconds)
    run_render(planned, [(output, STILL)], frames=(frame, frame), audio=False, workdir=workdir)
    err.print(f"{output}: frame at {seconds:.3f} s")


@commands.command()
def replay(
    meeting: Annotated[Path, typer.Argument(help="a recorded meeting folder (MJR files and "
                                                 "events.jsonl)")],
    into: Annotated[Path, typer.Option("--into", help="the recordings folder to write into")],
    events_url: Annotated[str | None, typer.Option(
        "--events", help="post the meeting's Janus events here (melter serve's /janus/events)")
    ] = None,
    room: Annotated[str | None, typer.Option(
        "--room", help="replay as this room (file names and events); default: the original")
    ] = None,
    speed: Annotated[float, typer.Option("--speed", help="1 = the meeting's own pace")] = 1.0,
    split_writes: Annotated[bool, typer.Option(
        "--split-writes", help="write each frame in two pieces, cut at a pseudo-random byte, "
                               "as a buffered writer flushes")] = False,
    split_seed: Annotated[int, typer.Option("--split-seed", help="seed for --split-writes' "
                                                                "cuts")] = 0,
    user: Annotated[str | None, typer.Option(envvar="MELTER_JANUS_USER")] = None,
    password: Annotated[str | None, typer.Option(envvar="MELTER_JANUS_PASSWORD")] = None,
    token: Annotated[str | None, typer.Option(envvar="MELTER_JANUS_TOKEN")] = None,
) -> None:
    """Replay a recorded meeting live: files grow and events arrive at their own times, moved
    to now."""
    import time

    from melter.replay import ReplayReport, event_poster, plan_replay, shifted
    from melter.replay import replay as run_replay

    plan = shifted(plan_replay(meeting, room), int(time.time() * 1e6), room)
    post = event_poster(events_url, user, password, token) if events_url else None
    err.print(f"{meeting}: {len(plan.files)} files, {len(plan.events)} events over "
              f"{(plan.end_us - plan.start_us) / 1e6:.1f} s, into {into}")

    def progress(report: ReplayReport, elapsed: float) -> None:
        err.print(f"{elapsed:7.1f} s: {report.frames} frames, {report.events} events posted")

    report = run_replay(plan, into, post, speed=speed, progress=progress,
                        split_writes=split_writes, split_seed=split_seed)
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(report.statuses.items())) or "none"
    err.print(f"replayed {report.files} files ({report.frames} frames, {report.bytes} bytes) "
              f"and {report.events} events in {report.posts} posts (status {statuses}) in "
              f"{report.elapsed_s:.1f} s; latest step {report.max_late_s * 1000:.0f} ms late")
    if any(not status.startswith("2") for status in report.statuses):
        raise typer.Exit(1)


@commands.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="print the version")] = False,
) -> None:
    if version:
        out.print(f"melter {__version__}")
        raise typer.Exit(0)


def _warn(message: str) -> None:
    """One line on stderr per warning, unwrapped, so it can be grepped."""
    sys.stderr.write(f"warning: {' '.join(message.split())}\n")


def _fail(message: str) -> None:
    """One line on stderr, however long (no wrapping: scripts grep it)."""
    sys.stderr.write(f"melter: error: {' '.join(mask_secrets(message).split())}\n")


class _WarningLines(logging.Handler):
    """Warnings the library logs (a melt restarted, ...) as the command's own warning lines."""

    def emit(self, record: logging.LogRecord) -> None:
        _warn(mask_secrets(record.getMessage()))


def _library_warnings() -> None:
    """Show the library's logged warnings as warning lines (media commands only: the farm's
    and the service's commands log through their own handlers)."""
    library = logging.getLogger("melter")
    if not any(isinstance(h, _WarningLines) for h in library.handlers):
        library.addHandler(_WarningLines(logging.WARNING))
        library.propagate = False


def main() -> None:
    """Entry point: map Melter's errors to exit code 1 with one line, never a traceback."""
    try:
        commands()  # click handles usage errors (exit 2) and --help itself
    except MelterError as exc:
        _fail(str(exc))
        sys.exit(EXIT_INPUT)
    except KeyboardInterrupt:
        _fail("interrupted")
        sys.exit(130)
    except ModuleNotFoundError as exc:
        from melter.extras import missing_module_message

        _fail(missing_module_message(exc) or f"{type(exc).__name__}: {exc}")
        sys.exit(EXIT_INPUT)
    except Exception as exc:  # anything unforeseen still gets one line, not a traceback
        _fail(f"{type(exc).__name__}: {exc}")
        sys.exit(EXIT_INPUT)


if __name__ == "__main__":
    main()
