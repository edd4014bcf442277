"""A fixed-cost renderer in place of melt, to measure the farm itself (``farm_bench.py``, and
the farm tests that need a job of known length).

Not part of the job model: a worker runs it only when its environment names it,
``MELTER_UNIT_HOOK=bench.stand_in:run_unit`` (with this repository on ``PYTHONPATH``), and
then only for jobs whose metadata ask for it: ``"metadata": {"stand_in": {"seconds": 0.5,
"busy": false}}``. Every other job renders as usual.
"""

from __future__ import annotations

import time
from typing import Any

from melter.farm import runner

#: The metadata key naming a job's stand-in.
KEY = "stand_in"
MAX_SECONDS = 3600.0


def asked(metadata: dict[str, Any]) -> tuple[float, bool] | None:
    """The stand-in a job's metadata asks for (seconds, busy), or None."""
    value = metadata.get(KEY)
    if not isinstance(value, dict):
        return None
    seconds = float(value.get("seconds", 0))
    if not 0 <= seconds <= MAX_SECONDS:
        raise ValueError(f"stand_in.seconds must be within 0 and {MAX_SECONDS:.0f}")
    return seconds, bool(value.get("busy", False))


def run_unit(attempt: Any, record: Any) -> bool:
    """Sleep or burn CPU for the job's stand-in cost, then commit a small file per output;
    False (the unit renders as usual) for a job that asks for no stand-in."""
    stand_in = asked(record.spec.metadata)
    if stand_in is None:
        return False
    seconds, busy = stand_in
    attempt.stage("rendering")
    # Sleeping costs wall time; busy costs CPU time (as a render does: slower when shared).
    clock = time.process_time if busy else time.monotonic
    began = clock()
    end = began + seconds
    while True:
        now = clock()
        if now >= end:
            break
        if busy:
            stop = min(end, now + 0.05)
            while clock() < stop:
                pass
        else:
            time.sleep(min(0.05, end - now))
        attempt.progress(round((clock() - began) * 1000), max(1, round(seconds * 1000)))
    written = []
    for k, output in enumerate(record.outputs):
        temp = runner.attempt_dir(attempt, record, k) / f"stand-in{output.path.suffix}"
        temp.write_bytes(b"melter stand-in output\n")
        written.append((k, temp))
    runner.commit_outputs(attempt, record, written,
                          {"stand_in": {"seconds": seconds, "busy": busy}}, media=False)
    return True
