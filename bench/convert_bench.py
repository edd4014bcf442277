#!/usr/bin/env python3
"""Benchmark ``melter convert`` against ``janus-pp-rec`` on long recordings.

Steps:

1. Build long MJR00002 recordings (default 10, 30 and 60 minutes) by repeating the packets of
   two real ~24 s recordings (Opus audio and VP8 video) with RTP sequence numbers, RTP
   timestamps and arrival times carried on, so each file looks like one unbroken session.
2. Convert each file with both tools (audio to .opus, video to .webm), alternating which tool
   goes first, and measure each child's wall time and peak RSS (``os.wait4``).
3. Check with ffprobe that both outputs cover the same duration, print a table and write
   ``<out>/convert_bench.json``.

Run from the repository root::

    python -m bench.convert_bench                  # 10, 30, 60 minutes; 3 runs at 60
    python -m bench.convert_bench --minutes 5      # quick check (5 minutes only)
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import hashlib
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from melter import __version__ as melter_version
from melter.mjr.reader import MjrReader, Variant

RECORDINGS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "dev-three-party-vp8"
SOURCES = {
    "audio": RECORDINGS / "videoroom-2001-user-501-1795700513534356-audio-0.mjr",
    "video": RECORDINGS / "videoroom-2001-user-501-1795700513534447-video-1.mjr",
}
OUTPUT_SUFFIX = {"audio": ".opus", "video": ".webm"}
RTP_CLOCK = {"opus": 48000, "multiopus": 48000, "vp8": 90000, "vp9": 90000, "h264": 90000}
SHORTER_LENGTHS = (10, 30)  # minutes, built besides --minutes to show memory against length
JANUS_PP_REC = "/usr/bin/janus-pp-rec"
FLOOR_SCRIPT = Path(__file__).resolve().parent / "pyav_floor.py"

_FRAME_PREFIX = struct.Struct("!4sIH")  # b"MEET", arrival ms, length
_SEQ_TS = struct.Struct("!HI")  # RTP bytes 2-7: sequence number, timestamp


# -- building long recordings -----------------------------------------------------------------
@dataclass
class Source:
    """One real recording loaded into memory (it is small), ready to be repeated."""

    path: Path
    kind: str
    codec: str
    header_bytes: bytes  # b"MJR00002" + u16 length + JSON, copied verbatim
    packets: list[tuple[int, bytes]]  # (arrival ms, RTP bytes) in file order
    clock: int
    seq_step: int  # sequence numbers one repetition uses
    ts_step: int  # RTP ticks one repetition lasts: span + one packet (frame) interval
    ts_first: int

    @property
    def period_s(self) -> float:
        return self.ts_step / self.clock


def _most_common_positive(values: list[int]) -> int:
    counts = collections.Counter(v for v in values if v > 0)
    if not counts:
        raise SystemExit("cannot find a packet interval in the source recording")
    return counts.most_common(1)[0][0]


def _is_vp8_keyframe(rtp: bytes) -> bool:
    """Whether an RTP packet starts a VP8 key frame (RFC 7741 descriptor, then P bit = 0)."""
    csrc = rtp[0] & 0x0F
    pos = 12 + 4 * csrc
    if rtp[0] & 0x10:  # header extension
        ext_words = struct.unpack_from("!H", rtp, pos + 2)[0]
        pos += 4 + 4 * ext_words
    first = rtp[pos]
    if not (first & 0x10) or first & 0x07:  # start of partition 0
        return False
    pos += 1
    if first & 0x80:
        ext = rtp[pos]
        pos += 1
        if ext & 0x80:
            pos += 2 if rtp[pos] & 0x80 else 1
        if ext & 0x40:
            pos += 1
        if ext & 0x30:
            pos += 1
    return not (rtp[pos] & 0x01)


def load_source(path: Path) -> Source:
    reader = MjrReader(path)
    header = reader.header
    if header.variant is not Variant.V2:
        raise SystemExit(f"{path}: expected an MJR00002 recording, got {header.variant}")
    with path.open("rb") as handle:
        header_bytes = handle.read(header.frames_offset)
    packets = [(frame.arrival_ms or 0, frame.data) for frame in reader.frames()]
    if reader.warnings:
        raise SystemExit(f"{path}: source is damaged: {reader.warnings}")
    if not packets:
        raise SystemExit(f"{path}: no packets")
    seqs = [struct.unpack_from("!H", data, 2)[0] for _, data in packets]
    stamps = [struct.unpack_from("!I", data, 4)[0] for _, data in packets]
    seq_step = ((seqs[-1] - seqs[0]) & 0xFFFF) + 1
    deltas = [(b - a) & 0xFFFFFFFF for a, b in itertools.pairwise(stamps)]
    interval = _most_common_positive([d for d in deltas if d < 0x80000000])
    ts_span = (stamps[-1] - stamps[0]) & 0xFFFFFFFF
    if header.kind == "video" and header.codec == "vp8" and not _is_vp8_keyframe(packets[0][1]):
        print(f"warning: {path.name} does not start with a VP8 key frame", file=sys.stderr)
    return Source(
        path=path,
        kind=header.kind,
        codec=header.codec,
        header_bytes=header_bytes,
        packets=packets,
        clock=RTP_CLOCK[header.codec],
        seq_step=seq_step,
        ts_step=ts_span + interval,
        ts_first=stamps[0],
    )


def build_recording(source: Source, target: Path, seconds: float) -> dict[str, Any]:
    """Write ``source`` repeated until ``seconds`` of RTP time; return what was written.

    Repetition ``k`` adds ``k * seq_step`` to sequence numbers (mod 2^16), ``k * ts_step`` to
    RTP timestamps (mod 2^32) and the same span in milliseconds to arrival times, so RTP time
    and arrival time advance together and no artificial clock skew appears. The file is cut at
    a whole frame: every packet whose timestamp is before the target is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    limit_ticks = round(seconds * source.clock)
    pack_prefix = _FRAME_PREFIX.pack
    pack_seq_ts = _SEQ_TS.pack_into
    written = 0
    repetition = 0
    last_arrival = 0
    temp = target.with_name(target.name + ".part")
    with temp.open("wb", buffering=1 << 20) as out:
        out.write(source.header_bytes)
        done = False
        while not done:
            tick_offset = repetition * source.ts_step
            arrival_offset = round(tick_offset * 1000 / source.clock)
            seq_offset = repetition * source.seq_step
            for arrival, data in source.packets:
                seq, stamp = _SEQ_TS.unpack_from(data, 2)
                relative = ((stamp - source.ts_first) & 0xFFFFFFFF) + tick_offset
                if relative >= limit_ticks:
                    done = True
                    break
                rtp = bytearray(data)
                pack_seq_ts(rtp, 2, (seq + seq_offset) & 0xFFFF, (stamp + tick_offset) & 0xFFFFFFFF)
                last_arrival = arrival + arrival_offset
                out.write(pack_prefix(b"MEET", last_arrival, len(rtp)))
                out.write(rtp)
                written += 1
            repetition += 1
    os.replace(temp, target)
    return {
        "file": str(target),
        "kind": source.kind,
        "codec": source.codec,
        "target_s": seconds,
        "packets": written,
        "repetitions": round(written / len(source.packets), 3),
        "bytes": target.stat().st_size,
        "last_arrival_ms": last_arrival,
    }


# -- measuring --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measurement:
    wall_s: float
    cpu_s: float  # user + system
    max_rss_kb: int
    exit_code: int


@dataclass(frozen=True)
class Launcher:
    """How to start one tool: the command's first words, and its environment."""

    prefix: list[str]
    env: dict[str, str] | None = None
    cwd: Path | None = None


def run_child(command: list[str], log: Path, launcher: Launcher | None = None) -> Measurement:
    """Run ``command``; measure its wall time, CPU time, peak RSS (KiB) and exit code.

    ``os.wait4`` gives the rusage of exactly this child, so nothing else run by this script
    (ffprobe, earlier runs) is mixed in. CPU time is reported besides wall time because it
    moves less when other work shares the machine.
    """
    env = launcher.env if launcher else None
    cwd = launcher.cwd if launcher else None
    with log.open("ab") as sink:
        sink.write(("\n$ " + " ".join(command) + "\n").encode())
        sink.flush()
        start = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=sink, stderr=sink, stdin=subprocess.DEVNULL, env=env, cwd=cwd
        )
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
    return Measurement(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, process.returncode)


def ffprobe(path: Path) -> dict[str, Any]:
    """Container duration and packet count of the first stream, as ffprobe reports them."""
    result = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_packets",
            "-show_entries",
            "format=duration:stream=codec_name,nb_read_packets",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return {"error": result.stderr.strip()[-500:]}
    info = json.loads(result.stdout)
    stream = (info.get("streams") or [{}])[0]
    duration = info.get("format", {}).get("duration")
    return {
        "duration_s": float(duration) if duration is not None else None,
        "codec": stream.get("codec_name"),
        "packets": int(stream["nb_read_packets"]) if "nb_read_packets" in stream else None,
        "bytes": path.stat().st_size,
    }


def melter_launcher(snapshot: Path | None = None) -> Launcher:
    """The installed ``melter`` script itself (not a pyenv or other shim found on PATH).

    With ``snapshot`` (a folder holding a copy of the ``melter`` package) the same entry point
    runs from that copy instead, so edits made to the working tree meanwhile are not measured.
    """
    if snapshot is not None:
        entry = "import sys; from melter.cli import main; sys.argv[0] = 'melter'; main()"
        env = dict(os.environ, PYTHONPATH=str(snapshot))
        return Launcher([sys.executable, "-c", entry], env=env, cwd=snapshot)
    beside = Path(sys.executable).parent / "melter"
    if beside.is_file():
        return Launcher([str(beside)])
    found = shutil.which("melter")
    return Launcher([found] if found else [sys.executable, "-m", "melter.cli"])


def take_snapshot(folder: Path) -> Path:
    """Copy the imported ``melter`` package under ``folder``; return the folder to import from."""
    import melter

    package = Path(melter.__file__).resolve().parent
    target = folder / "melter"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def startup_cost(work: Path, launcher: Launcher, runs: int = 3) -> dict[str, Any]:
    """``melter --version``: the fixed start-up cost included in every melter figure."""
    command = [*launcher.prefix, "--version"]
    samples = [run_child(command, work / "startup.log", launcher) for _ in range(runs)]
    return {
        "command": " ".join(command),
        "wall_s_median": round(_median([s.wall_s for s in samples]), 3),
        "cpu_s_median": round(_median([s.cpu_s for s in samples]), 3),
        "max_rss_kb_median": _median([s.max_rss_kb for s in samples]),
    }


def tool_commands(
    source: Path, output_dir: Path, kind: str, launcher: Launcher
) -> dict[str, tuple[list[str], Path, Launcher | None]]:
    suffix = OUTPUT_SUFFIX[kind]
    janus_out = output_dir / f"{kind}.janus-pp-rec{suffix}"
    melter_out = output_dir / f"{kind}.melter{suffix}"
    return {
        "janus-pp-rec": ([JANUS_PP_REC, str(source), str(janus_out)], janus_out, None),
        "melter": (
            [*launcher.prefix, "convert", str(source), "-o", str(melter_out)],
            melter_out,
            launcher,
        ),
    }


def pyav_floor(
    janus: tuple[list[str], Path, Launcher | None],
    janus_output: dict[str, Any],
    kind: str,
    runs: int,
    log: Path,
    pair_index: int,
) -> dict[str, Any]:
    """Time ``pyav_floor.py`` (start Python, import PyAV, mux janus-pp-rec's packet count of
    its average size) against janus-pp-rec again, alternating, ``runs`` times each.

    No converter that writes its packets through PyAV's Python API can be faster than this.
    """
    packets, size = janus_output.get("packets"), janus_output.get("bytes")
    if not packets or not size:
        return {"skipped": "janus-pp-rec's output could not be probed"}
    janus_command, _, _ = janus
    floor_out = log.with_name(f"{kind}.pyav-floor{OUTPUT_SUFFIX[kind]}")
    floor_command = [
        sys.executable,
        str(FLOOR_SCRIPT),
        kind,
        str(packets),
        str(size // packets),
        str(floor_out),
    ]
    samples: dict[str, list[Measurement]] = {"janus-pp-rec": [], "pyav floor": []}
    commands = {"janus-pp-rec": janus_command, "pyav floor": floor_command}
    for run in range(runs):
        order = (
            ["janus-pp-rec", "pyav floor"]
            if (pair_index + run) % 2
            else ["pyav floor", "janus-pp-rec"]
        )
        for tool in order:
            measured = run_child(commands[tool], log)
            if measured.exit_code != 0:
                return {"skipped": f"{tool} failed (exit {measured.exit_code}); see {log}"}
            samples[tool].append(measured)
            print(
                f"  run {run + 1}/{runs} {tool:<12} {measured.wall_s:7.2f} s wall "
                f"{measured.cpu_s:7.2f} s cpu {measured.max_rss_kb / 1024:7.1f} MB"
            )
    floor_out.unlink(missing_ok=True)
    medians = {
        tool: {
            "wall_s_median": round(_median([r.wall_s for r in rs]), 3),
            "cpu_s_median": round(_median([r.cpu_s for r in rs]), 3),
        }
        for tool, rs in samples.items()
    }
    return {
        "command": " ".join(floor_command),
        "packets": packets,
        "payload_bytes": size // packets,
        **{f"{tool} {key}": value for tool, m in medians.items() for key, value in m.items()},
        "ratio_wall": round(
            medians["pyav floor"]["wall_s_median"] / medians["janus-pp-rec"]["wall_s_median"], 2
        ),
        "ratio_cpu": round(
            medians["pyav floor"]["cpu_s_median"]
            / max(medians["janus-pp-rec"]["cpu_s_median"], 1e-3),
            2,
        ),
    }


def _warm_cache(path: Path) -> None:
    with path.open("rb") as handle:
        while handle.read(1 << 22):
            pass


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _version_of(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError:
        return "unavailable"
    text = (result.stdout + result.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def melter_source_state(package: Path | None = None) -> dict[str, Any]:
    """Which melter code was measured: commit, local changes, and a hash of the sources.

    The package is installed in editable mode, so uncommitted edits are what runs.
    """
    import melter

    repo_package = Path(melter.__file__).resolve().parent
    package = package or repo_package
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", "-C", str(repo_package.parent), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        return result.stdout.rstrip("\n") if result.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", repo_package.name).splitlines()
    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "changed_files": [line[3:] for line in changed],
        "sources_sha256": digest.hexdigest()[:16],
    }


def _janus_version() -> str:
    result = subprocess.run(  # a header-only parse prints the version banner
        [JANUS_PP_REC, "-H", str(SOURCES["audio"])], capture_output=True, text=True, check=False
    )
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("Janus version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


# -- report -----------------------------------------------------------------------------------
def _mb(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def print_table(cases: list[dict[str, Any]]) -> None:
    head = (
        f"{'length':>6} {'kind':<5} {'runs':>4} | {'wall s: janus':>13} {'melter':>7} {'ratio':>6}"
        f" | {'cpu s: janus':>12} {'melter':>7} {'ratio':>6} | {'RSS MB: janus':>13} "
        f"{'melter':>7} {'ratio':>6} | {'dur s: janus':>12} {'melter':>9}"
    )
    print(head)
    print("-" * len(head))
    for case in cases:
        j, m = case["tools"]["janus-pp-rec"], case["tools"]["melter"]
        if not case["ok"]:
            failed = [t for t, v in case["tools"].items() if any(v["exit_codes"])]
            print(
                f"{case['minutes']:>3g}min {case['kind']:<5} {case['runs']:>4} | "
                f"FAILED: {', '.join(failed)} (see the log in the work folder)"
            )
            continue
        print(
            f"{case['minutes']:>3g}min {case['kind']:<5} {case['runs']:>4} | "
            f"{j['wall_s_median']:>13.2f} {m['wall_s_median']:>7.2f} "
            f"{case['ratio_wall']:>6.1f} | "
            f"{j['cpu_s_median']:>12.2f} {m['cpu_s_median']:>7.2f} "
            f"{case['ratio_cpu']:>6.1f} | "
            f"{_mb(j['max_rss_kb_median']):>13} {_mb(m['max_rss_kb_median']):>7} "
            f"{case['ratio_rss']:>6.2f} | "
            f"{j['output'].get('duration_s') or float('nan'):>12.3f} "
            f"{m['output'].get('duration_s') or float('nan'):>9.3f}"
        )


def flatness(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Peak RSS at the longest length against the shortest, per tool and kind."""
    result: dict[str, Any] = {}
    for kind in ("audio", "video"):
        of_kind = sorted(
            (c for c in cases if c["kind"] == kind and c["ok"]), key=lambda c: c["minutes"]
        )
        if len(of_kind) < 2:
            continue
        short, long = of_kind[0], of_kind[-1]
        for tool in ("janus-pp-rec", "melter"):
            first = short["tools"][tool]["max_rss_kb_median"]
            last = long["tools"][tool]["max_rss_kb_median"]
            growth = last / first - 1
            result[f"{tool}/{kind}"] = {
                "rss_mb_by_minutes": {
                    str(c["minutes"]): round(c["tools"][tool]["max_rss_kb_median"] / 1024, 1)
                    for c in of_kind
                },
                "growth_percent": round(100 * growth, 1),
                "flat": abs(growth) <= 0.10,
                "compared": f"{long['minutes']} min vs {short['minutes']} min",
            }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60, help="longest length (default 60)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="JSON report folder")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for the generated recordings and outputs "
        "(default: <out>/work; several hundred MB at 60 minutes)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per tool at the longest length")
    parser.add_argument(
        "--short-runs", type=int, default=3, help="runs per tool at the shorter lengths"
    )
    parser.add_argument("--keep", action="store_true", help="keep generated media afterwards")
    parser.add_argument(
        "--snapshot",
        action="store_true",
        help="run melter from a copy of its package taken at the start, so edits made to the "
        "working tree during the run are not measured",
    )
    args = parser.parse_args(argv)

    out_dir: Path = args.out.resolve()
    work: Path = (args.work or out_dir / "work").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    lengths = sorted({m for m in SHORTER_LENGTHS if m < args.minutes} | {args.minutes})

    snapshot = take_snapshot(work / "snapshot") if args.snapshot else None
    launcher = melter_launcher(snapshot)
    code_before = melter_source_state(snapshot / "melter" if snapshot else None)
    sources = {kind: load_source(path) for kind, path in SOURCES.items()}
    for kind, source in sources.items():
        print(
            f"source {kind}: {source.path.name}: {len(source.packets)} packets, "
            f"{source.period_s:.3f} s per repetition, {source.seq_step} sequence numbers"
        )

    startup = startup_cost(work, launcher)
    print(
        f"melter --version alone: {startup['wall_s_median']:.2f} s, "
        f"{startup['max_rss_kb_median'] / 1024:.1f} MB"
    )

    cases: list[dict[str, Any]] = []
    built: list[dict[str, Any]] = []
    pair_index = 0
    for minutes in lengths:
        runs = args.runs if minutes == lengths[-1] else args.short_runs
        label = f"{minutes:g}min"
        for kind in ("audio", "video"):
            source = sources[kind]
            recording = work / label / f"{kind}.mjr"
            began = time.perf_counter()
            info = build_recording(source, recording, minutes * 60)
            info["build_s"] = round(time.perf_counter() - began, 2)
            built.append(info)
            print(
                f"\n[{label} {kind}] built {recording} ({info['packets']} packets, "
                f"{info['bytes'] / 1e6:.1f} MB) in {info['build_s']} s"
            )
            _warm_cache(recording)
            commands = tool_commands(recording, work / label, kind, launcher)
            load_before = os.getloadavg()[0]
            log = work / label / f"{kind}.log"
            log.unlink(missing_ok=True)
            results: dict[str, list[tuple[Measurement, int]]] = {"janus-pp-rec": [], "melter": []}
            for run in range(runs):
                order = ["janus-pp-rec", "melter"]
                if pair_index % 2:
                    order.reverse()
                pair_index += 1
                for position, tool in enumerate(order):
                    command, output, tool_launcher = commands[tool]
                    output.unlink(missing_ok=True)
                    measured = run_child(command, log, tool_launcher)
                    results[tool].append((measured, position))
                    print(
                        f"  run {run + 1}/{runs} {tool:<12} {measured.wall_s:7.2f} s wall "
                        f"{measured.cpu_s:7.2f} s cpu {measured.max_rss_kb / 1024:7.1f} MB"
                        f"  exit {measured.exit_code}"
                    )
                    if measured.exit_code != 0:
                        print(f"  {tool} failed; see {log}", file=sys.stderr)
            tools: dict[str, Any] = {}
            for tool, tool_runs in results.items():
                output = commands[tool][1]
                probe = ffprobe(output) if output.exists() else {"error": "no output"}
                measures = [r for r, _ in tool_runs]
                tools[tool] = {
                    "command": " ".join(commands[tool][0]),
                    "wall_s": [round(r.wall_s, 3) for r in measures],
                    "cpu_s": [round(r.cpu_s, 3) for r in measures],
                    "max_rss_kb": [r.max_rss_kb for r in measures],
                    "ran_first": [position == 0 for _, position in tool_runs],
                    "exit_codes": [r.exit_code for r in measures],
                    "wall_s_median": round(_median([r.wall_s for r in measures]), 3),
                    "cpu_s_median": round(_median([r.cpu_s for r in measures]), 3),
                    "max_rss_kb_median": _median([r.max_rss_kb for r in measures]),
                    "output": probe,
                }
            j, m = tools["janus-pp-rec"], tools["melter"]
            floor = pyav_floor(commands["janus-pp-rec"], j["output"], kind, runs, log, pair_index)
            ok = not any(code for tool in tools.values() for code in tool["exit_codes"])
            j_dur, m_dur = j["output"].get("duration_s"), m["output"].get("duration_s")
            case = {
                "minutes": minutes,
                "kind": kind,
                "codec": source.codec,
                "runs": runs,
                "ok": ok,
                "input": info,
                "tools": tools,
                "ratio_wall": round(m["wall_s_median"] / j["wall_s_median"], 2),
                "ratio_cpu": round(m["cpu_s_median"] / max(j["cpu_s_median"], 1e-3), 2),
                "ratio_rss": round(m["max_rss_kb_median"] / j["max_rss_kb_median"], 2),
                "duration_difference_s": (
                    round(m_dur - j_dur, 3) if j_dur is not None and m_dur is not None else None
                ),
                "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "pyav_floor": floor,
            }
            cases.append(case)
            print(
                f"  durations (ffprobe): janus-pp-rec {j_dur} s "
                f"({j['output'].get('packets')} packets), melter {m_dur} s "
                f"({m['output'].get('packets')} packets)"
            )

    code_after = melter_source_state(snapshot / "melter" if snapshot else None)
    working_tree_after = melter_source_state() if snapshot else code_after
    if code_after["sources_sha256"] != code_before["sources_sha256"]:
        print(
            "\nwarning: melter's sources changed during the run; figures mix two versions",
            file=sys.stderr,
        )
    flat = flatness(cases)
    print()
    print_table(cases)
    floors = [c for c in cases if "ratio_wall" in c.get("pyav_floor", {})]
    if floors:
        print("\nPyAV floor (start Python, import av, mux janus-pp-rec's packets; no reading):")
        for c in floors:
            f = c["pyav_floor"]
            print(
                f"  {c['minutes']:>3g}min {c['kind']:<5} {f['packets']:>7} packets of "
                f"{f['payload_bytes']} B: wall janus-pp-rec {f['janus-pp-rec wall_s_median']:.2f}"
                f" s, floor {f['pyav floor wall_s_median']:.2f} s, ratio {f['ratio_wall']:.2f}"
                f" (CPU {f['ratio_cpu']:.2f})"
            )
    if flat:
        print("\npeak RSS against length (medians):")
        for key, value in flat.items():
            sizes = ", ".join(f"{k} min {v} MB" for k, v in value["rss_mb_by_minutes"].items())
            verdict = "flat" if value["flat"] else "GROWS"
            print(f"  {key:<19} {sizes}: {value['growth_percent']:+.1f} % ({verdict})")

    report = {
        "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "melter": melter_version,
            "melter_code": code_before,
            "melter_code_changed_during_run": (
                code_after["sources_sha256"] != code_before["sources_sha256"]
            ),
            "melter_run_from_snapshot": snapshot is not None,
            "melter_working_tree_after_run": working_tree_after,
            "janus_pp_rec": _janus_version(),
            "ffprobe": _version_of(["ffprobe", "-version"]),
        },
        "method": {
            "sources": {k: str(v) for k, v in SOURCES.items()},
            "repetition_s": {k: round(s.period_s, 6) for k, s in sources.items()},
            "lengths_minutes": lengths,
            "runs_longest": args.runs,
            "runs_shorter": args.short_runs,
            "timing": "wall clock around each child; peak RSS = ru_maxrss from os.wait4",
            "order": "janus-pp-rec and melter alternate which runs first",
            "statistic": "median over runs",
        },
        "recordings": built,
        "melter_startup": startup,
        "cases": cases,
        "rss_flatness": flat,
    }
    target = out_dir / "convert_bench.json"
    target.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {target}")
    if not args.keep:  # remove only what this run created
        for minutes in lengths:
            shutil.rmtree(work / f"{minutes:g}min", ignore_errors=True)
        (work / "startup.log").unlink(missing_ok=True)
        if snapshot is not None:
            shutil.rmtree(snapshot, ignore_errors=True)
        if not any(work.iterdir()):
            work.rmdir()
    return (
        0
        if all(code == 0 for c in cases for t in c["tools"].values() for code in t["exit_codes"])
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
