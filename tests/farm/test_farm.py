"""The render farm against real Redis and real worker processes.

Meetings are the short fixtures, copied under a temporary storage root, composed on a small
canvas (the farm is under test here, not the compositor). Workers run with a 4 s lease and a
1 s sweep, so a lost worker's job comes back within seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import av
import pytest

from melter.farm.store import Dispatch
from tests.helpers.farm import (
    FRAME,
    FarmHarness,
    alive,
    harness,
    video_frame_count,
)

__all__ = ["harness"]  # the fixture, imported for pytest

FIXTURES = Path(__file__).parent.parent / "fixtures"


def meeting_span(fixture: str) -> float:
    """First to last packet of the meeting, plus the last audio packet's 20 ms (truth from the
    fixture's manifest, as in test_render)."""
    files = json.loads((FIXTURES / fixture / "manifest.json").read_text())["files"]
    start = min(f["mjr_first_packet_us"] for f in files)
    end = max(f["mjr_first_packet_us"] + f["rtp"]["file_offset_ms_last"] * 1000 for f in files)
    return (end - start) / 1e6 + 0.020


class Callbacks:
    """A local HTTP endpoint collecting the farm's callbacks."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/done"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


class Events:
    """Celery events seen on the farm's broker (what Flower is fed)."""

    def __init__(self, celery: Any) -> None:
        self.events: list[dict[str, Any]] = []
        self.receiver: Any = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(celery,), daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self, celery: Any) -> None:
        with celery.connection_for_read() as connection:
            self.receiver = celery.events.Receiver(
                connection, handlers={"task-progress": self.events.append})
            self.ready.set()
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True


def test_a_job_renders_on_a_worker(harness: FarmHarness) -> None:
    meeting = harness.meeting("dev-two-party-h264")
    callbacks = Callbacks()
    events = Events(harness.farm.celery)
    try:
        harness.start_worker("w1")
        began = time.monotonic()
        job = harness.submit(meeting, "two-party.mp4", callback_url=callbacks.url,
                             metadata={"meeting": "2002"})
        info = harness.wait(job, timeout=90)
        elapsed = time.monotonic() - began
        harness.wait_until(lambda: any(c["state"] == "done" for c in callbacks.received), 10,
                           "the callback")
    finally:
        events.close()
        callbacks.close()
    assert info["state"] == "done", info
    assert info["attempts"] == 1 and info["progress"] == 100.0 and info["worker"] == "w1@test"
    assert info["error"] is None and info["lost_workers"] == []
    output = harness.outputs / "two-party.mp4"
    assert info["outputs"] == [str(output)]
    # The output lasts the meeting's span, to within two frames.
    span = meeting_span("dev-two-party-h264")
    frames = video_frame_count(output)
    assert abs(frames * FRAME - span) <= 2 * FRAME, (frames, span)
    with av.open(str(output)) as container:
        audio = container.streams.audio[0]
        audio_s = float(audio.duration * audio.time_base)
    assert abs(audio_s - span) <= 2 * FRAME
    # The manifest beside it.
    manifest = json.loads((harness.outputs / "two-party.mp4.manifest.json").read_text())
    assert manifest["job"] == job
    assert manifest["output"]["video"]["frames"] == frames
    assert manifest["output"]["sha256"] == hashlib.sha256(output.read_bytes()).hexdigest()
    assert manifest["layout"]["source"] == "inline"
    assert manifest["layout"]["document"]["canvas"]["width"] == 320
    recorded = {Path(i["path"]).name: i["sha256"] for i in manifest["inputs"]}
    for path in meeting.iterdir():
        assert recorded[path.name] == hashlib.sha256(path.read_bytes()).hexdigest()
    tools = manifest["tools"]
    assert tools["melt"].startswith("melt 7") and tools["ffmpeg"].startswith("ffmpeg version")
    assert tools["pyav"] == av.__version__ and tools["melter"]
    assert manifest["attempt"]["worker"] == "w1@test" and manifest["attempts"] == 1
    timings = manifest["timings"]
    assert timings["queued_s"] >= 0 and timings["render_s"] > 0 and timings["total_s"] > 0
    assert manifest["metadata"] == {"meeting": "2002"}
    # The callback, progress events (Flower's feed), and no scratch files left behind.
    # One callback per change of state, in order.
    assert [c["state"] for c in callbacks.received] == ["queued", "running", "done"]
    assert [c["sequence"] for c in callbacks.received] == [1, 2, 3]
    assert {c["id"] for c in callbacks.received} == {job}
    assert callbacks.received[-1]["job"]["outputs"] == [str(harness.outputs / "two-party.mp4")]
    assert harness.status(job)["callback"] == "delivered: HTTP 204"
    progress = [e for e in events.events if e.get("job") == job]
    assert progress and max(e["progress"] for e in progress) > 50
    assert {e["stage"] for e in progress} >= {"planning", "rendering"}
    assert sorted(p.name for p in harness.outputs.iterdir()) == [
        "two-party.mp4", "two-party.mp4.manifest.json"]
    # `melter status --json` and `melter jobs`.
    shown = json.loads(harness.run_cli("status", job, "--json").stdout)
    assert shown["state"] == "done" and shown["id"] == job
    listed = harness.run_cli("jobs", "--json").stdout.splitlines()
    assert [json.loads(line)["id"] for line in listed] == [job]
    print(f"\none job: {elapsed:.1f} s from submit to done, queued {info['timings']['queued_s']}"
          " s")


def test_two_workers_share_the_queue_and_manual_jobs_go_first(harness: FarmHarness) -> None:
    meeting = harness.meeting("dev-two-party-h264")
    harness.start_workers(["w1", "w2"])
    began = time.monotonic()
    jobs = [harness.submit(meeting, f"shared-{n}.mp4") for n in range(4)]
    infos = [harness.wait(job, timeout=120) for job in jobs]
    elapsed = time.monotonic() - began
    assert all(i["state"] == "done" for i in infos), infos
    workers = {i["worker"] for i in infos}
    assert workers == {"w1@test", "w2@test"}, workers
    spans = [(h["started"], h["ended"]) for i in infos for h in i["history"]]
    assert len(spans) == 4 and all(h["outcome"] == "done" for i in infos for h in i["history"])
    overlapping = any(a[0] < b[1] and b[0] < a[1] for n, a in enumerate(spans)
                      for b in spans[n + 1:])
    assert overlapping, spans
    for n in range(4):
        assert video_frame_count(harness.outputs / f"shared-{n}.mp4") > 500
    print(f"\n4 jobs on 2 workers: {elapsed:.1f} s")

    # One worker left: while it renders, three automatic jobs and then one manual job are
    # queued; the manual one is taken next.
    harness.stop_workers()
    harness.start_worker("w3")
    first = harness.submit(meeting, "first.mp4")
    harness.wait(first, ("running",), timeout=30)
    stand_in = {"stand_in": {"seconds": 0.5}}
    autos = [harness.submit(meeting, f"auto-{n}.mp4", **stand_in) for n in range(3)]
    manual = harness.submit(meeting, "manual.mp4", priority="manual", **stand_in)
    order = [first, *autos, manual]
    infos = [harness.wait(job, timeout=60) for job in order]
    assert all(i["state"] == "done" for i in infos)
    started = sorted(order, key=lambda job: harness.status(job)["timings"]["started"])
    assert started == [first, manual, *autos], [
        (job == manual, harness.status(job)["timings"]["started"]) for job in started]


def wait_until_rendering(harness: FarmHarness, job: str, percent: float) -> None:
    """Until melt is well into the job's single unit (so there is something to interrupt)."""

    def rendering() -> bool:
        info = harness.status(job)
        return info["state"] == "running" and info["units"]["main"]["progress"] >= percent

    harness.wait_until(rendering, 60, "the render to be under way")


def test_a_killed_worker_s_job_completes_once_elsewhere(harness: FarmHarness) -> None:
    meeting = harness.meeting("dev-three-party-vp8")
    w1, w2 = harness.start_workers(["w1", "w2"])
    job = harness.submit(meeting, "survivor.mp4")
    output = harness.outputs / "survivor.mp4"
    sightings: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # what anyone looking at the output path would see
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                sightings.append(output.stat().st_size)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        wait_until_rendering(harness, job, 20)
        victim = w1 if harness.status(job)["worker"] == w1.name else w2
        survivor = w2 if victim is w1 else w1
        melts = victim.melts()
        assert melts, "melt is not running under the worker"
        progress_at_kill = harness.status(job)["progress"]
        killed_at = time.monotonic()
        killed_wall = time.time()
        harness.kill_group(victim)  # SIGKILL: the worker, its pool process and melt
        harness.wait_until(lambda: not any(alive(pid) for pid in melts), 5, "melt to die")
        assert not output.exists()
        info = harness.wait(job, timeout=90)
        recovered = time.monotonic() - killed_at
        time.sleep(0.3)  # the output is linked a moment before the job reads done
    finally:
        stop.set()
        watcher.join()
    assert info["state"] == "done", info
    assert info["attempts"] == 2
    assert info["worker"] == survivor.name
    assert info["lost_workers"] == [victim.name]
    lost = [h for h in info["history"] if h["outcome"] == "lost"]
    assert len(lost) == 1 and lost[0]["attempt"] == 1 and "lost" in lost[0]["error"]
    done = [h for h in info["history"] if h["outcome"] == "done"]
    assert len(done) == 1 and done[0]["attempt"] == 2 and done[0]["worker"] == survivor.name
    # Exactly one output, never seen partial: every sighting is the final size.
    final = output.stat().st_size
    assert sightings and set(sightings) == {final}
    assert sorted(p.name for p in harness.outputs.iterdir()) == [
        "survivor.mp4", "survivor.mp4.manifest.json"]
    manifest = json.loads((harness.outputs / "survivor.mp4.manifest.json").read_text())
    assert manifest["attempts"] == 2 and manifest["attempt"]["worker"] == survivor.name
    assert [p["outcome"] for p in manifest["previous_attempts"]] == ["lost"]
    span = meeting_span("dev-three-party-vp8")
    assert abs(video_frame_count(output) * FRAME - span) <= 2 * FRAME
    # The dead attempt's message, delivered again (as Redis does after the visibility
    # timeout), starts nothing: its fencing token is stale.
    mtime = output.stat().st_mtime_ns
    harness.farm.send([Dispatch(job, "main", str(lost[0]["token"]))])
    harness.wait_until(lambda: "not started: job done" in survivor.text(), 20,
                       "the stale message to be dropped")
    assert harness.status(job)["attempts"] == 2 and output.stat().st_mtime_ns == mtime
    # The lease is 4 s and the sweep 1 s; the rest is the second render.
    assert recovered < 45, recovered
    print(f"\nworker killed at {progress_at_kill}%: lease expiry found "
          f"{_seconds(lost[0]['ended']) - killed_wall:.1f} s later, second attempt started "
          f"{_seconds(done[0]['started']) - killed_wall:.1f} s later on {survivor.name}, "
          f"job done {recovered:.1f} s later; attempts {info['attempts']}")


def _seconds(iso: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso).timestamp()


def test_cancel_kills_melt_and_writes_nothing(harness: FarmHarness) -> None:
    meeting = harness.meeting("dev-three-party-vp8")
    worker = harness.start_worker("w1")
    job = harness.submit(meeting, "cancelled.mp4")

    wait_until_rendering(harness, job, 10)
    melts = worker.melts()
    assert melts
    began = time.monotonic()
    done = harness.run_cli("cancel", job)
    assert "cancelled" in done.stderr
    gone = harness.wait_until(lambda: not any(alive(pid) for pid in melts), 10,
                              "melt to be killed")
    took = time.monotonic() - began
    info = harness.wait(job, ("cancelled",), timeout=5)
    harness.wait_until(lambda: harness.status(job)["units"]["main"]["state"] == "cancelled",
                       10, "the attempt to stop")
    assert harness.status(job)["state"] == "cancelled"
    assert [h["outcome"] for h in harness.status(job)["history"]] == ["cancelled"]
    assert info["error"] == "cancelled"
    assert list(harness.outputs.iterdir()) == []  # no output, no manifest, no scratch
    assert worker.process.poll() is None  # the worker lives on
    # Cancelling again, or retrying: the job runs again from the start.
    again = harness.run_cli("cancel", job, check=False)
    assert again.returncode == 1 and "already cancelled" in again.stderr
    assert harness.run_cli("retry", job).stdout.strip() == job
    info = harness.wait(job, timeout=90)
    assert info["state"] == "done" and (harness.outputs / "cancelled.mp4").exists()
    print(f"\ncancel: melt gone {gone:.2f} s after the command returned ({took:.2f} s in all)")


def test_corrupt_input_fails_clearly_without_blocking_and_keys_are_idempotent(
        harness: FarmHarness) -> None:
    broken = harness.storage / "meetings" / "broken"
    broken.mkdir(parents=True)
    for name in ("videoroom-9-user-1-1-audio-0.mjr", "videoroom-9-user-1-2-video-1.mjr"):
        (broken / name).write_bytes(b"\x00garbage" * 4000)
    good = harness.meeting("dev-two-party-h264")
    harness.start_worker("w1")
    bad_job = harness.submit(broken, "broken.mp4", max_attempts=3)
    good_job = harness.submit(good, "good.mp4")
    good_info = harness.wait(good_job, timeout=90)
    bad_info = harness.wait(bad_job, timeout=60)
    assert good_info["state"] == "done"
    assert bad_info["state"] == "failed"
    assert bad_info["attempts"] == 3
    assert "no usable recordings" in bad_info["error"]
    assert "not an MJR recording" in bad_info["error"] and "after 3 attempts" in bad_info["error"]
    failures = [h for h in bad_info["history"] if h["outcome"] == "failed"]
    assert [h["attempt"] for h in failures] == [1, 2, 3]
    assert not (harness.outputs / "broken.mp4").exists()
    # The good job was not held up behind the broken one's retries.
    assert good_info["timings"]["queued_s"] < 15
    shown = harness.run_cli("status", bad_job, "--json").stdout
    assert json.loads(shown)["state"] == "failed"

    # Submitting twice with one idempotency key gives one job; the CLI prints its id alone.
    first = harness.submit(good, "once.mp4", idempotency_key="meeting-2002")
    second = harness.submit(good, "once.mp4", idempotency_key="meeting-2002")
    done = harness.run_cli("submit", str(good), "-o", str(harness.outputs / "once.mp4"),
                           "--layout", str(_small_layout_file(harness)),
                           "--idempotency-key", "meeting-2002", check=False)
    assert first == second
    assert done.returncode == 1 and "different parameters" in done.stderr
    assert harness.wait(first, timeout=90)["state"] == "done"
    again = harness.submit(good, "once.mp4", idempotency_key="meeting-2002")
    assert again == first
    assert sorted(p.name for p in harness.outputs.glob("once*.mp4")) == ["once.mp4"]
    # Retrying a done job renders it again, as a new manual job writing a new version.
    original = (harness.outputs / "once.mp4").read_bytes()
    rerender = harness.run_cli("retry", first).stdout.strip()
    assert rerender != first
    info = harness.wait(rerender, timeout=90)
    assert info["state"] == "done" and info["priority"] == "manual"
    assert info["outputs"] == [str(harness.outputs / "once.v2.mp4")]
    assert info["metadata"]["rerender_of"] == first
    assert (harness.outputs / "once.mp4").read_bytes() == original  # untouched
    assert json.loads((harness.outputs / "once.v2.mp4.manifest.json").read_text())["job"] == (
        rerender)


def _small_layout_file(harness: FarmHarness) -> Path:
    import yaml

    from tests.helpers.farm import SMALL_LAYOUT

    path = harness.base / "other-layout.yaml"
    path.write_text(yaml.safe_dump({**SMALL_LAYOUT, "canvas": {"width": 640, "height": 360}}))
    return path


@pytest.mark.parametrize("value", ["../outside", "/etc"])
def test_paths_outside_the_storage_root_are_refused(harness: FarmHarness, value: str) -> None:
    from melter.errors import MelterError

    with pytest.raises(MelterError, match="outside the storage root"):
        harness.farm.submit({"inputs": [value], "outputs": [{"path": "x.mp4"}]})
    meeting = harness.meeting("dev-two-party-h264")
    with pytest.raises(MelterError, match="outside the storage root"):
        harness.farm.submit({"inputs": [str(meeting)], "outputs": [{"path": f"{value}/x.mp4"}]})


def test_the_soft_time_limit_kills_melt(tmp_path: Path) -> None:
    from tests.helpers.farm import test_redis_url

    farm = FarmHarness(tmp_path, test_redis_url(), settings={
        "MELTER_SOFT_TIME_LIMIT": "3", "MELTER_HARD_TIME_LIMIT": "20",
        "MELTER_VISIBILITY_TIMEOUT": "40"})
    try:
        meeting = farm.meeting("dev-three-party-vp8")
        worker = farm.start_worker("w1")
        # The full 1280x720 grid: several times longer than the limit, however fast the machine.
        job = farm.submit(meeting, "too-long.mp4", layout="grid")
        seen: list[int] = []

        def melt_running() -> bool:
            seen.extend(worker.melts())
            return bool(seen)

        farm.wait_until(melt_running, 20, "melt to start")
        info = farm.wait(job, timeout=30)
        assert info["state"] == "failed" and info["attempts"] == 1
        assert info["error"] == "time limit exceeded (3 s)"
        farm.wait_until(lambda: not any(alive(pid) for pid in seen), 5, "melt to be killed")
        assert not (farm.outputs / "too-long.mp4").exists()
        assert worker.process.poll() is None
    finally:
        farm.cleanup()


def test_a_warm_shutdown_finishes_the_running_job(harness: FarmHarness) -> None:
    meeting = harness.meeting("dev-three-party-vp8")
    worker = harness.start_worker("w1")
    job = harness.submit(meeting, "finished.mp4")

    wait_until_rendering(harness, job, 10)
    waiting = harness.submit(meeting, "waiting.mp4", stand_in={"seconds": 0.1})
    worker.process.send_signal(signal.SIGTERM)  # what `docker stop` sends the main process
    worker.process.wait(timeout=60)
    info = harness.status(job)
    assert info["state"] == "done" and info["attempts"] == 1 and info["worker"] == worker.name
    assert harness.status(waiting)["state"] == "queued"  # not taken, not lost
    harness.start_worker("w2")
    assert harness.wait(waiting, timeout=30)["state"] == "done"
