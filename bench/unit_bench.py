"""How long each farm unit of a chunked job takes before melt starts.

A job is submitted to a farm on Redis and its units are run one after another in this process
(no Celery worker): each is stopped when it is about to start melt, and the time from the
unit's start to that moment is printed. The first unit after ``main`` also prepares the media
(the cache is per job and worker); the video chunk units show what every further unit pays.

    python -m bench.unit_bench dev-turn-taking-vp8 --chunk 8
    python -m bench.unit_bench long:600 --chunk 120 --layout speaker --jobs 2
    python -m bench.unit_bench long:90 --tree /path/to/another/checkout   # compare

SOURCE is a fixture of ``tests/fixtures``, or ``long:<seconds>``: the farm tests' synthetic
meeting of three 10 fps publishers. Needs Redis (``--redis``); everything written there is
under a prefix of its own and deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: The farm tests' canvas: what is measured does not depend on the picture size.
SMALL_LAYOUT = {"name": "small", "canvas": {"width": 320, "height": 180, "fps": 30},
                "labels": {"enabled": False},
                "regions": [{"name": "grid", "max_rows": 4, "max_columns": 4, "fit": "crop"}]}


class _MeltStarts(Exception):
    pass


class _Task:
    def send_event(self, *_: Any, **__: Any) -> None:
        pass


def one_job(args: argparse.Namespace, storage: Path, base: Path, meeting: str
            ) -> dict[str, float]:
    """Seconds before melt of each unit of one job (``main``: the whole unit)."""
    import redis

    import melter.engine.mlt as mlt
    from melter.farm import runner
    from melter.farm.config import load_config
    from melter.farm.jobs import Farm

    try:
        from melter.farm.attempt import Attempt
    except ImportError:  # an older checkout
        from melter.farm.tasks import Attempt  # type: ignore[attr-defined,no-redef]

    prefix = f"munit-{secrets.token_hex(4)}"
    env = {**os.environ, "MELTER_BROKER_URL": args.redis, "MELTER_STORAGE_ROOT": str(storage),
           "MELTER_KEY_PREFIX": prefix, "MELTER_QUEUE_PREFIX": f"{prefix}-",
           "MELTER_BROKER_KEY_PREFIX": f"{prefix}:", "MELTER_CACHE_DIR": str(base / prefix)}
    env.pop("MELTER_CONFIG", None)
    farm = Farm(load_config(env))
    queue: list[Any] = []
    farm.send = queue.extend  # type: ignore[method-assign]
    started: list[float] = []

    def melt_starts() -> str:
        started.append(time.monotonic())
        raise _MeltStarts

    mlt.melt_binary = melt_starts  # type: ignore[assignment]
    timings: dict[str, float] = {}
    try:
        layout = SMALL_LAYOUT if args.layout == "small" else args.layout
        farm.submit({"inputs": [meeting], "layout": layout, "chunk_seconds": args.chunk,
                     "outputs": [{"path": f"out/{prefix}.mp4"}]})
        while queue:
            item = queue.pop(0)
            ok, info = farm.store.claim(item.job, item.unit, str(item.token), "bench@host", 600)
            assert ok, info
            attempt = Attempt(farm, _Task(), item.job, item.unit, str(item.token), "bench@host",
                              int(info))
            started.clear()
            began = time.monotonic()
            try:
                runner.run(attempt)
            except _MeltStarts:
                timings[item.unit] = started[0] - began
            finally:
                runner.cleanup_attempt(attempt)
            if item.unit == "main":
                timings["main"] = time.monotonic() - began
    finally:
        client = redis.Redis.from_url(args.redis)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a fixture name, or long:<seconds>")
    parser.add_argument("--chunk", type=float, default=8.0, help="chunk_seconds of the job")
    parser.add_argument("--layout", default="small", help="small (the tests' grid) or a "
                        "built-in layout's name")
    parser.add_argument("--jobs", type=int, default=3, help="jobs to measure")
    parser.add_argument("--tree", type=Path, default=REPO, help="the melter checkout to run")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/11")
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree))
    import melter

    if not Path(melter.__file__).resolve().is_relative_to(args.tree.resolve()):
        raise SystemExit(f"melter comes from {melter.__file__}, not {args.tree}")
    base = Path(tempfile.mkdtemp(prefix="melter-unit-bench-"))
    storage = base / "storage"
    (storage / "out").mkdir(parents=True)
    try:
        if args.source.startswith("long:"):
            from tests.helpers.farm import write_long_meeting

            write_long_meeting(storage / "meetings" / "long", float(args.source[5:]))
            meeting = "meetings/long"
        else:
            shutil.copytree(REPO / "tests" / "fixtures" / args.source,
                            storage / "meetings" / args.source)
            meeting = f"meetings/{args.source}"
        runs = [one_job(args, storage, base, meeting) for _ in range(args.jobs)]
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def line(what: str, values: list[float]) -> str:
        return (f"  {what:34s} median {statistics.median(values) * 1e3:8.1f} ms  "
                f"(min {min(values) * 1e3:.1f}, max {max(values) * 1e3:.1f}, n={len(values)})")

    print(f"{args.tree}: {args.source}, layout {args.layout}, chunks of {args.chunk} s, "
          f"{args.jobs} jobs")
    print(line("main unit (plans, dispatches)", [r["main"] for r in runs]))
    print(line("audio unit before melt (+ media)", [s for r in runs for u, s in r.items()
                                                    if u.startswith("a")]))
    print(line("video chunk unit before melt", [s for r in runs for u, s in r.items()
                                                if u.startswith("v")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
