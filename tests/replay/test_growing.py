"""Growing recordings are read safely: a replay that writes each frame in two pieces, as a
buffered writer flushing at arbitrary byte boundaries does, is read again and again while it
runs, by the reader, the track analysis and ``melter inspect``, and then watched by a real
``melter watch`` that renders it once, after it stopped growing.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import pytest

from melter.farm.jobs import Farm
from melter.mjr.reader import MjrReader
from melter.replay import plan_replay, replay, shifted
from melter.track import analyze
from tests.farm.test_farm import meeting_span
from tests.helpers.farm import FarmHarness
from tests.helpers.service import CLI, farm

__all__ = ["farm"]  # the fixture, used by name

FIXTURES = Path(__file__).parent.parent / "fixtures"
#: How far a growing track's end may move back as its offset settles.
SETTLE_US = 10_000
CUT = "file ends inside"


def _frames(path: Path) -> tuple[list[tuple[int | None, bytes]], list[str]]:
    reader = MjrReader(path)
    frames = [(f.arrival_ms, f.data) for f in reader.frames()]
    return frames, reader.warnings


def test_growing_files_always_read_as_a_prefix_of_the_final_file(tmp_path: Path) -> None:
    plan = shifted(plan_replay(FIXTURES / "janus-10fps-vp8"), int(time.time() * 1e6), "9101")
    into = tmp_path / "recordings"
    failures: list[BaseException] = []

    def run() -> None:
        try:
            replay(plan, into, None, speed=12.0, split_writes=True, split_seed=7)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    seen: dict[str, list[list[tuple[int | None, bytes]]]] = {}
    ends: dict[str, int] = {}
    reads = cut_reads = analyses = 0
    inspected: subprocess.CompletedProcess[str] | None = None
    try:
        while thread.is_alive():
            for path in sorted(into.glob("*.mjr")) if into.exists() else []:
                if path.stat().st_size == 0:
                    continue  # created, its header not yet written
                frames, warnings = _frames(path)
                reads += 1
                history = seen.setdefault(path.name, [])
                assert not history or len(frames) >= len(history[-1]), path.name
                history.append(frames)
                if any(CUT in w for w in warnings):
                    cut_reads += 1
                    if inspected is None:
                        inspected = subprocess.run(
                            [sys.executable, "-c", CLI, "inspect", "--json", str(path)],
                            capture_output=True, text=True, timeout=60)
                if frames and reads % 5 == 0:
                    analysis = analyze(path)
                    # A track is placed by its least-delayed packet so far, so a later packet
                    # that arrived with less delay moves the whole track a few ms earlier.
                    back = ends.get(path.name, 0) - analysis.end_us
                    assert back <= SETTLE_US, (path.name, back)
                    ends[path.name] = analysis.end_us
                    analyses += 1
            time.sleep(0.005)
    finally:
        thread.join()
    assert not failures, failures
    assert reads > 50 and cut_reads > 0 and analyses > 0, (reads, cut_reads, analyses)
    assert inspected is not None
    assert inspected.returncode == 0, inspected.stderr
    assert "Traceback" not in inspected.stderr + inspected.stdout
    assert len(seen) == len(plan.files)
    for name, history in seen.items():
        final, warnings = _frames(into / name)
        assert not warnings, warnings
        for frames in history:
            assert frames == final[:len(frames)], name
        assert len(history[-1]) <= len(final)
    print(f"reads {reads}, cut last frame in {cut_reads}, analyses {analyses}")


def _duration(path: Path) -> float:
    with av.open(str(path)) as container:
        return float(container.duration or 0) / 1e6


def test_watch_renders_a_replayed_meeting_once_after_it_stopped_growing(
        farm: FarmHarness) -> None:
    fixture = "dev-two-party-h264"
    incoming = farm.storage / "incoming"
    incoming.mkdir()
    quiet = 1.5
    farm.start_worker("w1")
    watcher = subprocess.Popen([sys.executable, "-c", CLI, "watch", str(incoming),
                                "--quiet-seconds", str(quiet)], env=farm.env,
                               stdout=(farm.base / "watch.log").open("a"),
                               stderr=subprocess.STDOUT)
    client = Farm(farm.config)
    try:
        writer = subprocess.Popen(
            [sys.executable, "-c", CLI, "replay", str(FIXTURES / fixture), "--into",
             str(incoming), "--speed", "4", "--split-writes"], env=farm.env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        began = time.monotonic()
        while writer.poll() is None:
            assert client.jobs() == [], "rendered while the files still grew"
            time.sleep(0.1)
        finished = time.monotonic()
        _, stderr = writer.communicate()
        assert writer.returncode == 0 and "Traceback" not in stderr, stderr
        farm.wait_until(lambda: len(client.jobs()) >= 1, 30, "the render's submission")
        # The quiet period counts from the files' last change, a little before the writer exits.
        waited = time.time() - max(p.stat().st_mtime for p in incoming.rglob("*.mjr"))
        job = client.jobs()[0]["id"]
        info = farm.wait(job, timeout=180)
        time.sleep(quiet + 1)
        jobs = client.jobs()
    finally:
        watcher.kill()
        watcher.wait()
    assert len(jobs) == 1, jobs
    assert info["state"] == "done", info
    assert quiet <= waited <= quiet + 3.0, waited
    output = Path(info["outputs"][0])
    span, length = meeting_span(fixture), _duration(output)
    print(f"replay {finished - began:.1f} s; submitted {waited:.2f} s after it; "
          f"output {length:.3f} s, meeting {span:.3f} s")
    assert length == pytest.approx(span, abs=0.1)
