#!/usr/bin/env python3
"""Damaged recordings at scale: ``inspect``, ``convert`` and ``plan`` on seeded damage.

Runs the cases of ``tests/helpers/fuzzcases.py`` (prefixes of real Opus, VP8 and H.264 recordings,
each with one damage: bit flips, overwrites, truncation, inserted and spliced bytes, length
fields, RTP header fields, arrival times, the JSON header) over worker processes, each under
an address-space cap, each case under a time limit. Prints and writes (``--out``, JSON) the
outcome counts by codec and damage, the failures, the slowest cases and the rate.

Run from the repository root::

    python -m bench.fuzz_bench                    # 100 000 cases, seed 1
    python -m bench.fuzz_bench --cases 2000 --seed 7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from tests.helpers import fuzzcases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("bench/out/fuzz_bench.json"))
    args = parser.parse_args()
    print(f"{args.cases} cases, seed {args.seed}, {args.workers} workers, each under "
          f"{fuzzcases.CAP_BYTES >> 20} MiB of address space and {fuzzcases.CASE_SECONDS:g} s "
          f"a case", flush=True)
    summary = fuzzcases.run(args.seed, args.cases, args.workers, progress=True)
    print(f"\n{summary.cases} cases in {summary.seconds:.0f} s "
          f"({summary.cases / summary.seconds:.1f} a second)")
    print("outcomes:", dict(summary.outcomes))
    for group in sorted(summary.by_kind):
        print(f"  {group:18} {dict(summary.by_kind[group])}")
    print("slowest cases (s, case):", summary.slowest)
    for finding in summary.findings[:50]:
        print("  FAILED", finding)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "cases": summary.cases, "seed": args.seed, "workers": args.workers,
        "cap_bytes": fuzzcases.CAP_BYTES, "case_seconds": fuzzcases.CASE_SECONDS,
        "seconds": round(summary.seconds, 1), "outcomes": dict(summary.outcomes),
        "by_kind": {k: dict(v) for k, v in summary.by_kind.items()},
        "slowest": summary.slowest, "findings": summary.findings,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }, indent=1))
    return 1 if summary.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
