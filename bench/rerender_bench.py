"""Re-render scale-out: how a re-render of a finished meeting spreads over the farm's workers,
against one single-pass render of the same meeting.

    python -m bench.rerender_bench --minutes 60 --fixture janus-mixed-fps-vp8 --chunk 30 --workers 2
    python -m bench.rerender_bench --minutes 3 --chunk 30 --workers 2      # a quick check

1. Builds a meeting of about ``--minutes`` from a fixture's real recordings played several times
   end to end (``bench/time_to_video.py``'s ``--long`` builder: real packets, no clock skew
   added), under the storage root of a temporary folder.
2. Single pass: ``melter render MEETING -o single.mp4 --layout L [--preset P] --jobs J
   --window W`` (the CLI, no broker; ``--single-jobs``, default 1: one melt at a time, as one
   worker renders; ``--single-window``, default the command's 60 s, 0 for one melt run over the
   whole meeting), timed from start to exit.
3. The same render on a real farm: its own Redis database (``--redis``) and key, queue and
   broker-key prefixes, ``--workers`` real ``melter worker`` processes (concurrency 1, started
   as ``tests/helpers/farm.py`` starts them, with the farm's default lease, heartbeat, sweep and
   dispatch settings), the job submitted with ``chunk_seconds = --chunk`` and priority
   ``manual``. When it is done, every unit's start and finish (the Redis unit records) are read
   and a table printed: unit, kind, frames, start (after the job's first unit started), seconds,
   milliseconds per frame, wait (from the moment the unit could run: ``main``'s end for a
   chunk's video and audio, the last part's end for the join), attempts, worker.
4. A summary: units, the sum of unit times, the longest video and audio units, the join, the
   ``main`` (planning) unit, the critical path (main + longest unit + join, what a farm with a
   worker per unit would take) and its ratio to the single pass (the goal is at most 1/20 for a
   one-hour meeting on a big enough farm), the sum over the workers (the bound of this farm's
   wall time) against the farm job's wall time, the CPU time of the single pass and of the
   farm's worker processes (with their melt and ffmpeg children), and per worker its units,
   busy time and idle gaps (a gap while a unit was waiting is a dispatch delay). Then the
   checks, measured with PyAV: the farm's output has the single pass's video frame count, its
   duration within one frame, and as many audio samples (decoded); and the same content
   (``time_to_video.compare``: every frame's picture means, the sound aligned sample for
   sample, no second that differs far more than the others).
5. A final JSON line with the numbers (for ``bench/README.md``).

Exit status 0 when the farm job is done and every check passed, 1 otherwise, 2 without Redis.
Needs Redis, ``melt``, ``ffmpeg`` and PyAV. Everything it made (workers, Redis keys, the folder)
is removed at the end; with ``--keep`` the folder (meeting, outputs, worker logs) stays.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import psutil

from bench import soak
from bench.time_to_video import build_long_meeting, compare
from melter.farm.config import load_config
from melter.farm.job import TERMINAL, UnitKind
from melter.farm.jobs import Farm
from tests.helpers.farm import FarmHarness, redis_available, video_frame_count

ROOT = Path(__file__).resolve().parent.parent
#: Video presets a chunked job renders (audio-only and HLS outputs are measured otherwise).
PRESETS = ("mp4", "720p", "1080p", "4k", "webm")
#: The test harness's quick lease and sweep settings; the benchmark runs the farm's defaults.
TEST_SETTINGS = ("MELTER_LEASE_SECONDS", "MELTER_HEARTBEAT_SECONDS", "MELTER_SWEEP_SECONDS",
                 "MELTER_DISPATCH_GRACE_SECONDS", "MELTER_RETRY_BACKOFF_SECONDS",
                 "MELTER_UNIT_HOOK", "MELTER_CHUNK_SECONDS")
KINDS = {UnitKind.MAIN: "plan", UnitKind.VIDEO: "video", UnitKind.AUDIO: "audio",
         UnitKind.JOIN: "join", UnitKind.RENDER: "render"}
GOAL = 1 / 20


@dataclass
class Unit:
    name: str
    kind: UnitKind
    first: int | None
    last: int | None
    started: float
    finished: float
    ready: float  # when it could have started: queued with nothing left to wait for
    worker: str
    attempts: int

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    @property
    def frames(self) -> int | None:
        return None if self.first is None or self.last is None else self.last - self.first + 1


@dataclass
class Measure:
    frames: int
    duration: float
    samples: int
    rate: int


def measure(path: Path) -> Measure:
    """Video packets, container duration, and decoded audio samples per channel."""
    frames = video_frame_count(path)
    samples = 0
    rate = 0
    with av.open(str(path)) as container:
        duration = float(container.duration or 0) / 1e6
        if container.streams.audio:
            stream = container.streams.audio[0]
            rate = stream.rate or 0
            for frame in container.decode(stream):
                samples += frame.samples
    return Measure(frames, duration, samples, rate)


def farm_cpu(harness: FarmHarness) -> float:
    """CPU seconds (user + system) of every worker process and their reaped children."""
    total = 0.0
    for worker in harness.workers:
        try:
            top = psutil.Process(worker.pid)
            processes = [top, *top.children(recursive=True)]
        except psutil.Error:
            continue
        for process in processes:
            with contextlib.suppress(psutil.Error):
                t = process.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
    return total


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# -- the farm's record of a job -----------------------------------------------------------------
def read_units(farm: Farm, job: str) -> list[Unit]:
    raw = farm.store.all_units(job)
    main = raw.get(UnitKind.MAIN.value, {})
    main_end = float(main.get("finished") or 0)
    units: list[Unit] = []
    for name, fields in raw.items():
        kind = UnitKind.of(name)
        deps = [d for d in (fields.get("deps") or "").split(",") if d]
        if kind is UnitKind.MAIN:
            ready = float(farm.store.job(job).get("created") or fields.get("started") or 0)
        elif deps:
            ready = max(float(raw[d].get("finished") or 0) for d in deps)
        else:
            ready = main_end
        units.append(Unit(
            name, kind,
            int(fields["first"]) if fields.get("first") else None,
            int(fields["last"]) if fields.get("last") else None,
            float(fields.get("started") or 0), float(fields.get("finished") or 0), ready,
            fields.get("worker") or "?", int(fields.get("attempts") or 0)))
    return sorted(units, key=lambda u: (u.started, u.name))


def workers_report(units: list[Unit], end: float) -> list[dict[str, Any]]:
    """Per worker: units, busy seconds, idle gaps between its units and at the end; a gap
    while some unit was ready and not yet started counts as a dispatch delay."""
    rows = []
    for worker in sorted({u.worker for u in units}):
        mine = sorted((u for u in units if u.worker == worker), key=lambda u: u.started)
        gaps = []
        handoffs = []
        for before, after in itertools.pairwise(mine):
            gap = after.started - before.finished
            gaps.append(gap)
            waiting = any(u.ready <= before.finished < u.started for u in units)
            if waiting:
                handoffs.append(gap)
        rows.append({
            "worker": worker,
            "units": len(mine),
            "busy_s": round(sum(u.seconds for u in mine), 3),
            "first_start_s": mine[0].started,
            "gaps_s": round(sum(gaps), 3),
            "max_gap_s": round(max(gaps), 3) if gaps else 0.0,
            "dispatch_gaps": len(handoffs),
            "dispatch_gap_max_s": round(max(handoffs), 3) if handoffs else 0.0,
            "dispatch_gap_median_s": round(statistics.median(handoffs), 3) if handoffs else 0.0,
            "idle_at_end_s": round(end - mine[-1].finished, 3),
        })
    return rows


# -- the run ------------------------------------------------------------------------------------
def single_pass(args: argparse.Namespace, base: Path, meeting: Path,
                output: Path) -> tuple[float, float]:
    """Wall and CPU seconds of ``melter render``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MELTER_") or k in ("MELTER_MELT", "MELTER_PURE_PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env["COLUMNS"] = "200"
    command = [sys.executable, "-c", soak.CLI, "render", str(meeting), "-o", str(output),
               "--layout", args.layout, "--jobs", str(args.single_jobs),
               "--window", f"{args.single_window:g}"]
    if args.preset:
        command += ["--preset", args.preset]
    log = base / "single.log"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run(command, env=env, cwd=base, stdout=out, stderr=subprocess.STDOUT,
                              check=False)
    wall = time.monotonic() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if done.returncode != 0 or not output.is_file():
        text = log.read_text(errors="replace")
        raise SystemExit(f"rerender_bench: single pass exited {done.returncode}:\n{text[-3000:]}")
    return wall, cpu


def wait_job(harness: FarmHarness, job: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    shown = time.monotonic()
    while True:
        info = harness.status(job)
        if info["state"] in TERMINAL:
            return info
        for worker in harness.workers:
            if worker.process.poll() is not None:
                raise SystemExit(f"rerender_bench: worker {worker.name} exited:\n"
                                 f"{worker.text()[-3000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"rerender_bench: job {job} still {info['state']} after "
                             f"{timeout:.0f} s")
        if time.monotonic() - shown >= 15:
            shown = time.monotonic()
            done = sum(1 for u in info["units"].values() if u["state"] == "done")
            print(f"  ... {info['state']} ({info['stage']}), {info['progress']:.1f} %, "
                  f"{done}/{len(info['units'])} units done; load {load()}", flush=True)
        time.sleep(0.1)


def table(units: list[Unit], t0: float) -> list[str]:
    rows = [f"{'unit':<8} {'kind':<6} {'frames':>17} {'start s':>8} {'seconds':>8} "
            f"{'ms/frame':>8} {'wait s':>7} {'att':>3}  worker"]
    for u in units:
        frames = (f"{u.frames} ({u.first}-{u.last})" if u.frames is not None else "")
        per = f"{u.seconds * 1000 / u.frames:8.1f}" if u.frames else " " * 8
        rows.append(f"{u.name:<8} {KINDS[u.kind]:<6} {frames:>17} {u.started - t0:8.2f} "
                    f"{u.seconds:8.2f} {per} {u.started - u.ready:7.2f} {u.attempts:>3}  "
                    f"{u.worker}")
    return rows


def run(args: argparse.Namespace, base: Path) -> int:
    harness = FarmHarness(base, args.redis)
    for name in TEST_SETTINGS:
        harness.env.pop(name, None)
    harness.config = load_config(harness.env)
    harness.farm = Farm(harness.config)
    try:
        return _run(args, base, harness)
    finally:
        harness.cleanup()


def _run(args: argparse.Namespace, base: Path, harness: FarmHarness) -> int:
    layout = args.layout
    if Path(layout).is_file():  # a layout file: both renders read the copy under the root
        copy = harness.storage / "layouts" / Path(layout).name
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(layout, copy)
        args.layout = layout = str(copy)
    suffix = ".webm" if args.preset == "webm" else ".mp4"
    meeting = harness.storage / "meetings" / f"{args.fixture}-long"
    began = time.monotonic()
    span, reps = build_long_meeting(args.fixture, args.minutes, meeting)
    size = sum(p.stat().st_size for p in meeting.glob("*.mjr"))
    print(f"rerender_bench: {args.fixture} x{reps} = {span:.1f} s ({span / 60:.1f} min, "
          f"{size / 1e6:.1f} MB of MJR) built in {time.monotonic() - began:.1f} s; layout "
          f"{layout}, preset {args.preset or 'mp4 (from the extension)'}; chunks of "
          f"{args.chunk:g} s, {args.workers} worker(s); Redis {args.redis} prefix "
          f"{harness.prefix}; folder {base}; {os.cpu_count()} CPUs, load {load()}", flush=True)

    single = base / f"single{suffix}"
    single_s, single_cpu = single_pass(args, base, meeting, single)
    print(f"single pass: {single_s:.2f} s wall, {single_cpu:.1f} s CPU (melter render "
          f"--jobs {args.single_jobs} --window {args.single_window:g}); load {load()}",
          flush=True)

    harness.start_workers([f"w{i}" for i in range(args.workers)])
    output = harness.outputs / f"farm{suffix}"
    out_spec: dict[str, Any] = {"path": str(output)}
    if args.preset:
        out_spec["preset"] = args.preset
    cpu_before = farm_cpu(harness)
    submitted = time.monotonic()
    job = harness.farm.submit({"inputs": [str(meeting)], "layout": layout,
                               "outputs": [out_spec], "chunk_seconds": args.chunk,
                               "priority": "manual"})
    timeout = args.timeout or max(600.0, 10 * single_s + 300)
    info = wait_job(harness, job, timeout)
    farm_wall = time.monotonic() - submitted
    cpu = farm_cpu(harness) - cpu_before
    fields = harness.farm.store.job(job)
    if info["state"] != "done":
        print(f"farm job {job}: {info['state']}: {info.get('error')}")
        for worker in harness.workers:
            print(f"--- {worker.name}\n{worker.text()[-3000:]}")
        return 1
    created, started, finished = (float(fields[k]) for k in ("created", "started", "finished"))
    units = read_units(harness.farm, job)
    print(f"farm job {job}: done in {farm_wall:.2f} s wall (submitted -> finished "
          f"{finished - created:.2f} s, of which queued {started - created:.2f} s); "
          f"{info['chunks']} chunk(s), {len(units)} units; load {load()}")
    for row in table(units, started):
        print("  " + row)

    main = next(u for u in units if u.kind is UnitKind.MAIN)
    videos = [u for u in units if u.kind is UnitKind.VIDEO]
    audios = [u for u in units if u.kind is UnitKind.AUDIO]
    joins = [u for u in units if u.kind is UnitKind.JOIN]
    parts = videos + audios
    total = sum(u.seconds for u in units)
    longest_video = max(videos, key=lambda u: u.seconds, default=None)
    longest_audio = max(audios, key=lambda u: u.seconds, default=None)
    longest_part = max(parts, key=lambda u: u.seconds, default=None)
    join_s = sum(u.seconds for u in joins)
    critical = main.seconds + (longest_part.seconds if longest_part else 0) + join_s
    waits = [u.started - u.ready for u in units if u.kind is not UnitKind.MAIN]
    join_wait = joins[0].started - joins[0].ready if joins else None
    per_worker = workers_report(units, finished)

    print(f"units: {len(units)} ({len(videos)} video, {len(audios)} audio, {len(joins)} join, "
          f"main); sum of unit times {total:.2f} s")
    print(f"main (planning) {main.seconds:.2f} s; longest video unit "
          + (f"{longest_video.name} {longest_video.seconds:.2f} s" if longest_video else "none")
          + "; longest audio unit "
          + (f"{longest_audio.name} {longest_audio.seconds:.2f} s" if longest_audio else "none")
          + f"; join {join_s:.2f} s")
    if videos:
        print(f"video units: median {statistics.median(u.seconds for u in videos):.2f} s, "
              f"{sum(u.seconds for u in videos):.2f} s in all; audio units: median "
              f"{statistics.median(u.seconds for u in audios):.2f} s, "
              f"{sum(u.seconds for u in audios):.2f} s in all")
    print(f"critical path = main + longest unit + join = {critical:.2f} s; / single pass "
          f"{single_s:.2f} s = {critical / single_s:.3f} (goal <= {GOAL:.3f} for an hour on a "
          f"big enough farm)")
    print(f"with {args.workers} worker(s): sum / workers = {total / args.workers:.2f} s; farm "
          f"job wall {farm_wall:.2f} s (first unit start -> done {finished - started:.2f} s); "
          f"farm wall / single pass = {farm_wall / single_s:.3f}")
    print(f"CPU: single pass {single_cpu:.1f} s, farm workers {cpu:.1f} s "
          f"({cpu / single_cpu:.2f} x); {os.cpu_count()} CPUs")
    if waits:
        print(f"waits from ready to start: median {statistics.median(waits):.2f} s, max "
              f"{max(waits):.2f} s; join waited {join_wait:.2f} s after its last part")
    for row in per_worker:
        print(f"  {row['worker']}: {row['units']} units, busy {row['busy_s']:.2f} s, first "
              f"start +{row['first_start_s'] - started:.2f} s, gaps between units "
              f"{row['gaps_s']:.2f} s (max {row['max_gap_s']:.2f}), of which "
              f"{row['dispatch_gaps']} while a unit waited (max {row['dispatch_gap_max_s']:.2f} s,"
              f" median {row['dispatch_gap_median_s']:.2f} s); idle at the end "
              f"{row['idle_at_end_s']:.2f} s")

    ref = measure(single)
    got = measure(output)
    fps = float(fields.get("fps") or 30)
    checks = {
        "frames_equal": got.frames == ref.frames,
        "duration_within_1_frame": abs(got.duration - ref.duration) <= 1 / fps + 1e-6,
        "audio_samples_equal": got.samples == ref.samples and got.rate == ref.rate,
    }
    print(f"single pass: {ref.frames} frames, {ref.duration:.3f} s, {ref.samples} audio samples "
          f"at {ref.rate} Hz; farm: {got.frames} frames, {got.duration:.3f} s "
          f"({(got.duration - ref.duration) * 1000:+.1f} ms), {got.samples} samples at "
          f"{got.rate} Hz")
    mix = base / "mix.wav"
    single_pass(argparse.Namespace(**{**vars(args), "preset": None}), base, meeting, mix)
    compared, same = compare(output, single, mix)
    checks["same_content"] = same
    print(f"against the single pass: {compared}")
    passed = all(checks.values())
    print("checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks.items()))

    result = {
        "bench": "rerender", "fixture": args.fixture, "minutes": args.minutes, "reps": reps,
        "span_s": round(span, 3), "frames": ref.frames, "fps": fps, "layout": args.layout,
        "preset": args.preset or "mp4", "chunk_s": args.chunk, "workers": args.workers,
        "cpus": os.cpu_count(), "chunks": info["chunks"], "units": len(units),
        "single_pass_s": round(single_s, 3), "single_pass_cpu_s": round(single_cpu, 1),
        "single_jobs": args.single_jobs, "single_window_s": args.single_window,
        "farm_cpu_s": round(cpu, 1),
        "unit_sum_s": round(total, 3), "main_s": round(main.seconds, 3),
        "longest_video_s": round(longest_video.seconds, 3) if longest_video else None,
        "longest_video_unit": longest_video.name if longest_video else None,
        "longest_audio_s": round(longest_audio.seconds, 3) if longest_audio else None,
        "longest_audio_unit": longest_audio.name if longest_audio else None,
        "video_sum_s": round(sum(u.seconds for u in videos), 3),
        "audio_sum_s": round(sum(u.seconds for u in audios), 3),
        "join_s": round(join_s, 3), "critical_path_s": round(critical, 3),
        "critical_over_single": round(critical / single_s, 4),
        "sum_over_workers_s": round(total / args.workers, 3),
        "farm_wall_s": round(farm_wall, 3), "farm_job_s": round(finished - created, 3),
        "farm_over_single": round(farm_wall / single_s, 4),
        "wait_median_s": round(statistics.median(waits), 3) if waits else None,
        "wait_max_s": round(max(waits), 3) if waits else None,
        "join_wait_s": round(join_wait, 3) if join_wait is not None else None,
        "dispatch_gap_max_s": max((r["dispatch_gap_max_s"] for r in per_worker), default=0.0),
        "retried_units": sum(1 for u in units if u.attempts > 1),
        "output": {"frames": got.frames, "duration_s": round(got.duration, 3),
                   "samples": got.samples},
        "single": {"frames": ref.frames, "duration_s": round(ref.duration, 3),
                   "samples": ref.samples},
        "compared": compared, "checks": checks, "pass": passed, "load_end": load(),
    }
    print("result: " + ("PASS" if passed else "FAIL"))
    print(json.dumps(result), flush=True)
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0,
                        help="length of the meeting to build (default 60)")
    parser.add_argument("--fixture", default="janus-mixed-fps-vp8",
                        help="fixture of tests/fixtures to repeat (default janus-mixed-fps-vp8)")
    parser.add_argument("--chunk", type=float, default=60.0,
                        help="the job's chunk_seconds (default 60, the farm's default)")
    parser.add_argument("--workers", type=int, default=2, help="farm workers (default 2)")
    parser.add_argument("--single-jobs", type=int, default=1,
                        help="the single pass's windows at once (melter render --jobs; "
                        "default 1: one melt at a time, as one worker renders)")
    parser.add_argument("--single-window", type=float, default=60.0,
                        help="the single pass's window seconds (melter render --window; "
                        "default 60, its default; 0: one melt run over the whole meeting)")
    parser.add_argument("--layout", default="grid",
                        help="a built-in layout's name or a layout file (default grid)")
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="output preset (default: mp4, from the extension)")
    parser.add_argument("--redis", default=os.environ.get(
        "MELTER_RERENDER_REDIS", "redis://127.0.0.1:6379/12"),
        help="Redis URL, a database of its own (default redis://127.0.0.1:6379/12)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for the farm job (default 10 x the single pass "
                        "+ 300 s, at least 600)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the folder (meeting, outputs, logs)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.minutes <= 0 or args.chunk <= 0:
        parser.error("--minutes and --chunk must be above 0")
    if not (soak.FIXTURES / args.fixture / "events.jsonl").is_file():
        parser.error(f"no fixture {args.fixture} with events.jsonl in {soak.FIXTURES}")
    if not redis_available(args.redis):
        print(f"rerender_bench: no Redis at {args.redis}", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="melter-rerender-"))
    try:
        return run(args, base)
    finally:
        if args.keep:
            print(f"rerender_bench: kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
