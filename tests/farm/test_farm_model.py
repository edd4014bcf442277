"""The farm without workers: job model, configuration, chunk planning, the state machine's
fencing (against real Redis), the command line, and Flower's authentication."""

from __future__ import annotations

import base64
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from melter.errors import MelterError
from melter.farm.config import load_config
from melter.farm.job import job_schema, parse_job
from melter.farm.store import JobCancelled, LeaseLost
from melter.windows import plan_chunks
from tests.helpers.farm import FarmHarness, harness

__all__ = ["harness"]


# -- model and configuration -------------------------------------------------------------------
def test_job_schema_and_validation() -> None:
    schema = job_schema()
    assert schema["required"] == ["inputs", "outputs"]
    assert set(schema["properties"]) >= {"inputs", "layout", "outputs", "priority",
                                         "callback_url", "idempotency_key", "metadata"}
    job = parse_job({"inputs": ["m"], "outputs": [{"path": "o.mp4"}]})
    assert job.priority == "auto" and job.layout == "grid"
    with pytest.raises(MelterError, match="priority"):
        parse_job({"inputs": ["m"], "outputs": [{"path": "o.mp4"}], "priority": "urgent"})
    with pytest.raises(MelterError, match="callback_url"):
        parse_job({"inputs": ["m"], "outputs": [{"path": "o.mp4"}], "callback_url": "ftp://x"})
    with pytest.raises(MelterError, match="outputs"):
        parse_job({"inputs": ["m"], "outputs": []})


def test_configuration_from_environment_and_file(tmp_path: Path) -> None:
    file = tmp_path / "farm.toml"
    file.write_text('broker_url = "redis://file/1"\nlease_seconds = 30\n')
    config = load_config({"MELTER_CONFIG": str(file), "MELTER_BROKER_URL": "redis://env/2",
                          "MELTER_STORAGE_ROOT": str(tmp_path)})
    assert config.broker_url == "redis://env/2"  # the environment wins
    assert config.lease_seconds == 30 and config.storage_root == tmp_path
    with pytest.raises(MelterError, match="visibility_timeout must exceed hard_time_limit"):
        load_config({"MELTER_VISIBILITY_TIMEOUT": "3600", "MELTER_SOFT_TIME_LIMIT": "7200",
                     "MELTER_HARD_TIME_LIMIT": "7500"})
    with pytest.raises(MelterError, match="lease_seconds"):
        load_config({"MELTER_LEASE_SECONDS": "1", "MELTER_HEARTBEAT_SECONDS": "1"})
    settings = __import__("melter.farm.celery_app", fromlist=["celery_settings"]).celery_settings(
        load_config({"MELTER_BROKER_URL": "redis://x/3"}))
    assert settings["task_acks_late"] and settings["task_reject_on_worker_lost"]
    assert settings["worker_prefetch_multiplier"] == 1
    assert settings["broker_transport_options"]["visibility_timeout"] > settings[
        "task_time_limit"] > settings["task_soft_time_limit"]
    assert settings["result_backend_transport_options"]["visibility_timeout"] == settings[
        "broker_transport_options"]["visibility_timeout"]
    assert [q.name for q in settings["task_queues"]] == ["manual", "auto", "live"]


def test_chunks_are_cut_at_scene_boundaries() -> None:
    fps = 30

    def plan(*starts: float) -> SimpleNamespace:
        return SimpleNamespace(scenes=[SimpleNamespace(start_us=round(s * 1e6)) for s in starts])

    frames = 3600 * fps
    # Scenes start at 0, 9:50, 21:00, 35:00 and 49:00: cuts go there when within a quarter
    # chunk of every ten minutes, else at ten minutes.
    ranges = plan_chunks(plan(0, 590, 1260, 2100, 2940), frames, fps, 600)
    cuts = [first / fps for first, _ in ranges]
    assert cuts == [0, 590, 1260, 1860, 2460, 2940]
    assert ranges[-1][1] == frames - 1
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(ranges))
    assert plan_chunks(plan(0), 100, fps, 600) == [(0, 99)]


# -- fencing, against Redis --------------------------------------------------------------------
def test_claims_leases_and_tokens_fence_attempts(harness: FarmHarness) -> None:
    store = harness.farm.store
    first = store.create("j1", {"spec": "{}", "outputs": "[]", "inputs": "[]"}, time.time(), 30)
    assert store.claim("j1", "main", "999", "w-stale", 5) == (False, "stale")
    assert store.claim("j1", "main", first.token, "w1", 0.3) == (True, "1")
    # The same message delivered again starts nothing.
    assert store.claim("j1", "main", first.token, "w2", 5) == (False, "unit running")
    assert store.heartbeat("j1", "main", first.token, 0.3, 0.5, "rendering") == "ok"
    time.sleep(0.4)  # the lease runs out: w1 is presumed dead
    assert store.expire("j1", "main", first.token, 3)[0] == "retry"
    [requeued] = store.due(time.time() + 1)
    assert requeued.token != first.token
    # The old attempt is fenced out: no heartbeat, no commit.
    assert store.heartbeat("j1", "main", first.token, 5, 0.9, "rendering") == "lost"
    with pytest.raises(LeaseLost):
        store.begin_commit("j1", "main", first.token, 5)
    assert store.claim("j1", "main", requeued.token, "w2", 5) == (True, "2")
    store.begin_commit("j1", "main", requeued.token, 5)
    assert store.complete("j1", "main", requeued.token, "out", 30, 60)[0] == "done"
    info = harness.farm.status("j1")
    assert info["state"] == "done" and info["attempts"] == 2
    assert [h["outcome"] for h in info["history"]] == ["lost", "done"]
    assert info["lost_workers"] == ["w1"]
    # A cancelled job's running attempt hears of it at its next heartbeat.
    second = store.create("j2", {"spec": "{}", "outputs": "[]", "inputs": "[]"}, time.time(), 30)
    assert store.claim("j2", "main", second.token, "w1", 5)[0]
    assert store.cancel("j2") == ("cancelled", ["main"])
    assert store.heartbeat("j2", "main", second.token, 5, 0.2, "rendering") == "cancelled"
    with pytest.raises(JobCancelled):
        store.begin_commit("j2", "main", second.token, 5)


# -- command line ------------------------------------------------------------------------------
def test_cli_submit_prints_the_id_alone(harness: FarmHarness) -> None:
    meeting = harness.meeting("dev-two-party-h264")
    done = harness.run_cli("submit", str(meeting), "-o", str(harness.outputs / "a.mp4"),
                           "--priority", "manual", "--meta", "room=2002")
    assert re.fullmatch(r"[0-9a-f]{16}\n", done.stdout), done.stdout
    job = done.stdout.strip()
    info = harness.farm.status(job)
    assert info["state"] == "queued" and info["priority"] == "manual"
    assert info["metadata"] == {"room": "2002"}
    assert job in harness.run_cli("jobs").stdout
    assert harness.run_cli("cancel", job).returncode == 0
    assert harness.farm.status(job)["state"] == "cancelled"
    outside = harness.run_cli("submit", "/etc", "-o", str(harness.outputs / "b.mp4"),
                              check=False)
    assert outside.returncode == 1 and "outside the storage root" in outside.stderr
    assert outside.stdout == ""
    env = {k: v for k, v in harness.env.items() if k != "MELTER_BROKER_URL"}
    nobroker = subprocess.run([sys.executable, "-m", "melter.farm", "status", job], env=env,
                              capture_output=True, text=True, timeout=60)
    assert nobroker.returncode == 1 and "MELTER_BROKER_URL" in nobroker.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_flower_needs_a_password(harness: FarmHarness) -> None:
    refused = harness.run_cli("flower", check=False)
    assert refused.returncode == 1 and "MELTER_FLOWER_PASSWORD" in refused.stderr
    port = _free_port()
    env = {**harness.env, "MELTER_FLOWER_USER": "ops", "MELTER_FLOWER_PASSWORD": "s3cret"}
    process = subprocess.Popen([sys.executable, "-m", "melter.farm", "flower", "--port",
                                str(port)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/workers"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                status = 200
            except urllib.error.HTTPError as exc:
                status = exc.code
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise AssertionError("flower did not start") from None
                time.sleep(0.2)
                continue
            break
        assert status == 401
        token = base64.b64encode(b"ops:s3cret").decode()
        request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        # The password is not on Flower's command line.
        assert b"s3cret" not in Path(f"/proc/{process.pid}/cmdline").read_bytes()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)


def test_kept_chunks_nobody_used_for_the_ttl_are_swept(harness: FarmHarness) -> None:
    """Chunks kept while a meeting went on, beside an output whose render never came: the
    sweep removes those older than ``parts_ttl_hours`` from folders no chunk was kept in for
    that long, then each folder once empty; nothing else (other files, links, a folder swapped
    for a link, a folder still in use)."""
    from melter.farm.sweeper import sweep_parts

    farm, store = harness.farm, harness.farm.store
    ttl = farm.config.parts_ttl_hours * 3600
    now = time.time()
    old, fresh = now - ttl - 3600, now - ttl + 3600
    chunk = "ab" * 32

    def parts(name: str, files: dict[str, float], noted: float) -> Path:
        folder = harness.outputs / name / ".melter-parts"
        folder.mkdir(parents=True)
        for file, mtime in files.items():
            (folder / file).write_bytes(b"x" * 10)
            os.utime(folder / file, (mtime, mtime))
        store.note_parts(str(folder), noted)
        return folder

    abandoned = parts("abandoned", {chunk + ".mp4": old, chunk + ".mka": old}, old)
    mixed = parts("mixed", {chunk + ".mp4": old, "cd" * 32 + ".mp4": fresh,
                            "notes.txt": old}, old)
    (mixed / ("ef" * 32 + ".mp4")).symlink_to(mixed / "notes.txt")
    in_use = parts("in-use", {chunk + ".mp4": old}, fresh)
    elsewhere = harness.base / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / (chunk + ".mp4")).write_bytes(b"x")
    os.utime(elsewhere / (chunk + ".mp4"), (old, old))
    (harness.outputs / "linked").mkdir()
    (harness.outputs / "linked" / ".melter-parts").symlink_to(elsewhere)
    store.note_parts(str(harness.outputs / "linked" / ".melter-parts"), old)

    assert sweep_parts(farm, now) == 3
    assert not abandoned.exists() and abandoned.parent.is_dir()
    assert sorted(p.name for p in mixed.iterdir()) == sorted(
        ["cd" * 32 + ".mp4", "ef" * 32 + ".mp4", "notes.txt"])
    assert (in_use / (chunk + ".mp4")).exists()
    assert (elsewhere / (chunk + ".mp4")).exists()
    # Swept folders are no longer tracked; the one in use still is, and is swept in its time.
    assert [f for f, _ in store.stale_parts(now + 2 * ttl)] == [str(in_use)]
    assert sweep_parts(farm, fresh + ttl + 1) == 1 and not in_use.exists()
    assert store.stale_parts(now + 2 * ttl) == []
