"""Benchmark of the render farm itself: queue overhead per job, and throughput against the
number of worker processes.

The renderer is replaced by a fixed-cost stand-in (``stand_in.py``, which the workers run
through their unit hook: sleep, or burn CPU with ``--busy``), so what is measured is the farm:
Redis state, Celery messages, claims, leases, commits (each job still writes its output file
and manifest).

    python -m bench.farm_bench                       # overhead, then N = 1 2 4 8 16
    python -m bench.farm_bench --workers 1 2 4 --cost 0.5 --jobs-per-worker 4 --json out.json

Needs Redis (``--redis``, default redis://127.0.0.1:6379/11); everything it writes there is
under its own prefixes and deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from melter.farm.config import load_config
from melter.farm.job import TERMINAL, JobState
from melter.farm.jobs import Farm

ROOT = Path(__file__).resolve().parent.parent


class Bench:
    def __init__(self, base: Path, redis_url: str) -> None:
        self.base = base
        self.redis_url = redis_url
        self.prefix = f"mbench-{secrets.token_hex(4)}"
        self.storage = base / "storage"
        (self.storage / "meeting").mkdir(parents=True)
        (self.storage / "meeting" / "placeholder.mjr").write_bytes(b"stand-in input")
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "MELTER_BROKER_URL": redis_url,
            "MELTER_STORAGE_ROOT": str(self.storage),
            "MELTER_KEY_PREFIX": self.prefix,
            "MELTER_QUEUE_PREFIX": f"{self.prefix}-",
            "MELTER_BROKER_KEY_PREFIX": f"{self.prefix}:",
            "MELTER_CACHE_DIR": str(base / "cache"),
            "MELTER_UNIT_HOOK": "bench.stand_in:run_unit",
        }
        self.env.pop("MELTER_CONFIG", None)
        self.farm = Farm(load_config(self.env))
        self.workers: list[subprocess.Popen] = []
        self.count = 0

    def start_workers(self, n: int) -> float:
        began = time.monotonic()
        logs = []
        for index in range(n):
            log = self.base / f"worker-{len(self.workers)}.log"
            logs.append(log)
            with log.open("w") as handle:
                self.workers.append(subprocess.Popen(
                    [sys.executable, "-m", "melter.farm", "worker", "-c", "1", "-n",
                     f"bench{len(self.workers)}-{index}@%h", "--loglevel", "warning"],
                    env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                    start_new_session=True))
        # Ready when every worker answers a ping.
        deadline = time.monotonic() + 120
        while True:
            replies = self.farm.celery.control.ping(timeout=1.0) or []
            if len(replies) >= len(self.workers):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(replies)} of {len(self.workers)} workers answered")
        return time.monotonic() - began

    def stop_workers(self) -> None:
        for process in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.workers:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.workers.clear()

    def submit(self, cost: float, busy: bool) -> str:
        self.count += 1
        return self.farm.submit({
            "inputs": ["meeting"],
            "outputs": [{"path": f"out/job-{self.count}.mp4"}],
            "metadata": {"stand_in": {"seconds": cost, "busy": busy}},
        })

    def wait(self, jobs: list[str], timeout: float = 600) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        pending = set(jobs)
        while pending:
            for job in list(pending):
                if self.farm.store.r.hget(self.farm.store.job_key(job), "state") in TERMINAL:
                    pending.discard(job)
            if time.monotonic() > deadline:
                raise SystemExit(f"{len(pending)} jobs not done after {timeout} s")
            time.sleep(0.02)
        return [self.farm.status(job) for job in jobs]

    def cleanup(self) -> None:
        self.stop_workers()
        client = redis.Redis.from_url(self.redis_url)
        keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])


def _seconds(stamp: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(stamp).timestamp()


def overhead(bench: Bench, samples: int) -> dict[str, float]:
    """One idle worker; jobs submitted one at a time: submit → start and submit → done."""
    to_start = []
    to_done = []
    for _ in range(samples):
        began = time.time()
        job = bench.submit(0.0, False)
        [info] = bench.wait([job])
        created = _seconds(info["timings"]["submitted"])
        to_start.append(_seconds(info["timings"]["started"]) - created)
        to_done.append(_seconds(info["timings"]["finished"]) - began)
    to_start.sort()
    to_done.sort()
    return {
        "samples": samples,
        "submit_to_start_median_ms": round(statistics.median(to_start) * 1000, 1),
        "submit_to_start_p95_ms": round(to_start[int(0.95 * (samples - 1))] * 1000, 1),
        "submit_to_done_median_ms": round(statistics.median(to_done) * 1000, 1),
        "submit_to_done_p95_ms": round(to_done[int(0.95 * (samples - 1))] * 1000, 1),
    }


def scaling(bench: Bench, counts: list[int], cost: float, per_worker: int,
            busy: bool) -> list[dict[str, Any]]:
    rows = []
    running = 0
    for n in counts:
        startup = bench.start_workers(n - running)
        running = n
        jobs_count = n * per_worker
        began = time.monotonic()
        jobs = [bench.submit(cost, busy) for _ in range(jobs_count)]
        submitted = time.monotonic() - began
        infos = bench.wait(jobs)
        elapsed = time.monotonic() - began
        assert all(i["state"] == JobState.DONE for i in infos), [i["error"] for i in infos]
        workers = {i["worker"] for i in infos}
        queued = sorted(i["timings"]["queued_s"] for i in infos)
        rows.append({
            "workers": n,
            "jobs": jobs_count,
            "cost_s": cost,
            "wall_s": round(elapsed, 2),
            "throughput_jobs_per_s": round(jobs_count / elapsed, 2),
            "ideal_jobs_per_s": round(n / cost, 2) if cost else None,
            "efficiency": round(jobs_count * cost / elapsed / n, 3) if cost else None,
            "workers_used": len(workers),
            "submit_s": round(submitted, 2),
            "median_wait_s": round(statistics.median(queued), 2),
            "max_wait_s": round(queued[-1], 2),
            "worker_start_s": round(startup, 1),
        })
        print(_row(rows[-1]), flush=True)
    return rows


def _row(row: dict[str, Any]) -> str:
    return (f"{row['workers']:>3} workers  {row['jobs']:>4} jobs  {row['wall_s']:>7.2f} s  "
            f"{row['throughput_jobs_per_s']:>6.2f} jobs/s  (ideal {row['ideal_jobs_per_s']}, "
            f"efficiency {row['efficiency']}, {row['workers_used']} used, longest wait "
            f"{row['max_wait_s']} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/11")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--cost", type=float, default=1.0, help="seconds per stand-in job")
    parser.add_argument("--jobs-per-worker", type=int, default=4)
    parser.add_argument("--busy", action="store_true", help="burn CPU instead of sleeping")
    parser.add_argument("--overhead-samples", type=int, default=30)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="farm-bench-") as folder:
        bench = Bench(Path(folder), args.redis)
        try:
            print(f"machine: {os.cpu_count()} CPUs; stand-in cost {args.cost} s "
                  f"({'busy' if args.busy else 'sleep'})", flush=True)
            bench.start_workers(1)
            bench.wait([bench.submit(0.0, False)])  # warm up the pool process
            over = overhead(bench, args.overhead_samples)
            print("queue overhead, one idle worker: submit→start median "
                  f"{over['submit_to_start_median_ms']} ms (p95 {over['submit_to_start_p95_ms']}"
                  f" ms); submit→done median {over['submit_to_done_median_ms']} ms (p95 "
                  f"{over['submit_to_done_p95_ms']} ms)", flush=True)
            bench.stop_workers()
            rows = scaling(bench, sorted(args.workers), args.cost, args.jobs_per_worker,
                           args.busy)
        finally:
            bench.cleanup()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"overhead": over, "scaling": rows,
                                         "cpus": os.cpu_count(), "busy": args.busy}, indent=2))


if __name__ == "__main__":
    main()
