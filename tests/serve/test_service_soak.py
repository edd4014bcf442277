"""A short run of the service soak (``bench/soak.py``): 15 s of hostile and valid Janus event
posts from eight clients against a real ``melter serve`` and a farm worker, with one real
meeting posted at once among them and rendered. The script checks its own results (one render
per real meeting with the meeting's length, no 5xx, no unexpected answer, every fake room
followed to its end and its render skipped, the keys under its prefix within
``MELTER_MAX_ROOMS``; memory flatness needs three minutes and is left to the full soak) and
exits 1 otherwise; the figures, the tracker's counters and the rooms per client address are
printed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers.service import service_redis_url

ROOT = Path(__file__).resolve().parents[2]


def test_a_short_soak_passes() -> None:
    url = service_redis_url()
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "0.25",
         "--meeting-pace", "burst", "--grace", "1", "--redis", url],
        capture_output=True, text=True, timeout=240)
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "result: PASS" in result.stdout
    assert "1 job(s), submitted" in result.stdout and " s and done " in result.stdout
    assert "MELTER_MAX_ROOMS=20000" in result.stdout
    assert "tracker: events " in result.stdout and "dropped_room_limit " in result.stdout
    assert "rooms_crowded_out " in result.stdout
    assert "rooms by client address at the end: 127.0.0.2 (real meetings) 1, " in result.stdout
