"""`melter replay`: a recorded meeting played again at its own pace, moved to now.

The replayed files must hold the very packets Janus wrote (arrival times included), each file
must grow as its packets arrived, and each event must be posted when Janus sent it, with every
time moved by the same whole number of seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from melter.errors import InputError
from melter.meeting import VIDEOROOM
from melter.mjr.reader import MjrReader
from melter.replay import plan_replay, replay, shifted

FIXTURES = Path(__file__).parent.parent / "fixtures"
MEETINGS = ["janus-10fps-vp8", "dev-two-party-h264"]


class FakeClock:
    """Time that passes only when the replay sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize("name", MEETINGS)
def test_replayed_files_hold_the_same_packets_moved_to_now(tmp_path: Path, name: str) -> None:
    now_us = int(time.time() * 1e6)
    plan = shifted(plan_replay(FIXTURES / name), now_us, room="9001")
    fake = FakeClock()
    report = replay(plan, tmp_path, None, speed=100.0, clock=fake.clock, sleep=fake.sleep)
    assert abs(plan.start_us + plan.shift_us - now_us) < 1_000_000
    assert plan.shift_us % 1_000_000 == 0
    sources = sorted((FIXTURES / name).glob("*.mjr"))
    assert report.files == len(sources)
    total = 0
    for source in sources:
        match = VIDEOROOM.match(source.stem)
        assert match is not None
        target = tmp_path / source.name.replace(f"-{match['room']}-", "-9001-").replace(
            match["stamp"], str(int(match["stamp"]) + plan.shift_us))
        original, copy = MjrReader(source), MjrReader(target)
        assert copy.header.created_us == original.header.created_us + plan.shift_us
        assert copy.header.first_packet_us == original.header.first_packet_us + plan.shift_us
        assert copy.header.codec == original.header.codec
        pairs = list(zip(original.frames(), copy.frames(), strict=True))
        assert all(a.data == b.data and a.arrival_ms == b.arrival_ms for a, b in pairs)
        total += len(pairs)
    assert report.frames == total
    # The whole meeting took its own length, divided by the speed.
    assert fake.now - 1000.0 == pytest.approx((plan.end_us - plan.start_us) / 1e6 / 100, abs=0.01)


def test_each_event_is_posted_at_its_time_with_the_files_grown_as_far(tmp_path: Path) -> None:
    """When an event is posted, every file holds exactly the packets that had arrived by its
    time: a receiver sees what it would have seen from Janus."""
    name = "janus-10fps-vp8"
    plan = shifted(plan_replay(FIXTURES / name), int(time.time() * 1e6), room="9002")
    fake = FakeClock()
    seen: list[tuple[float, list[dict[str, Any]], dict[str, int]]] = []

    def post(events: list[dict[str, Any]]) -> str:
        counts = {p.name: sum(1 for _ in MjrReader(p).frames()) for p in tmp_path.glob("*.mjr")
                  if p.stat().st_size > 0 and MjrReader(p).size > MjrReader(p).header.frames_offset}
        seen.append((fake.now, events, counts))
        return "200"

    report = replay(plan, tmp_path, post, speed=1.0, clock=fake.clock, sleep=fake.sleep)
    lines = (FIXTURES / name / "events.jsonl").read_text().splitlines()
    assert report.events == len(lines) and report.statuses == {"200": report.posts}
    arrivals = {}
    for source in (FIXTURES / name).glob("*.mjr"):
        reader = MjrReader(source)
        created = reader.header.created_us
        assert created is not None
        arrivals[source.name.split("-user-")[1][:3] + source.name[-11:]] = [
            created + f.arrival_ms * 1000 for f in reader.frames() if f.arrival_ms is not None]
    originals = [json.loads(line)["timestamp"] for line in lines]
    posted = [e["timestamp"] - plan.shift_us for _, events, _ in seen for e in events]
    assert posted == sorted(originals)
    for at, events, counts in seen:
        first = events[0]["timestamp"] - plan.shift_us
        # Posted at the group's first event's time (to the microsecond of the fake clock).
        assert at - 1000.0 == pytest.approx((first - plan.start_us) / 1e6, abs=1e-6)
        for target, count in counts.items():
            key = target.split("-user-")[1][:3] + target[-11:]
            assert count == sum(1 for t in arrivals[key] if t <= first), (target, at)
    rooms = {e["event"]["data"]["room"] for _, events, _ in seen for e in events
             if isinstance(e.get("event"), dict) and "room" in e["event"].get("data", {})}
    assert rooms == {9002}


def test_a_replay_never_overwrites_a_recording(tmp_path: Path) -> None:
    plan = shifted(plan_replay(FIXTURES / "janus-10fps-vp8"), int(time.time() * 1e6), "9003")
    fake = FakeClock()
    replay(plan, tmp_path, None, speed=1000.0, clock=fake.clock, sleep=fake.sleep)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(InputError, match="already exists"):
        replay(plan, tmp_path, None, speed=1000.0, clock=fake.clock, sleep=fake.sleep)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("content", [None, b"not json\n", b'{"no": "timestamp"}\n'])
def test_a_folder_that_is_no_meeting_gets_one_line(tmp_path: Path, content: bytes | None) -> None:
    folder = tmp_path / "meeting"
    folder.mkdir()
    if content is not None:
        source = next((FIXTURES / "janus-10fps-vp8").glob("*.mjr"))
        (folder / source.name).write_bytes(source.read_bytes())
        (folder / "events.jsonl").write_bytes(content)
    result = subprocess.run(
        [sys.executable, "-m", "melter.cli", "replay", str(folder), "--into",
         str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert str(folder) in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
