"""Redis crashes and comes back (append-only file on): no job is lost.

The test runs its own redis-server (``appendonly yes``, ``appendfsync everysec``, no RDB) on a
free port, kills it with SIGKILL while two jobs run and two wait in the queue, and starts it
again on the same files.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers.farm import FRAME, FarmHarness, video_frame_count


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        log = (self.folder / "redis.log").open("a")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
             "--maxmemory-policy", "noeviction"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return
            except (redis.ConnectionError, redis.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise AssertionError("redis-server did not start") from None
                time.sleep(0.05)

    def crash(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_no_job_is_lost_when_redis_restarts(tmp_path: Path, private_redis: RedisServer) -> None:
    harness = FarmHarness(tmp_path / "farm", private_redis.url,
                          settings={"MELTER_LEASE_SECONDS": "10"})
    try:
        meeting = harness.meeting("dev-two-party-h264")
        harness.start_workers(["w1", "w2"])
        jobs = [harness.submit(meeting, f"restart-{n}.mp4") for n in range(4)]

        def two_running() -> bool:
            return [harness.status(j)["state"] for j in jobs].count("running") == 2

        harness.wait_until(two_running, 30, "two jobs to run")
        states = sorted(harness.status(j)["state"] for j in jobs)
        assert states == ["queued", "queued", "running", "running"]
        time.sleep(1.5)  # appendfsync everysec: what was written a second ago is on disk
        private_redis.crash()
        down_at = time.monotonic()
        time.sleep(1.0)
        private_redis.start()
        print(f"\nRedis down for {time.monotonic() - down_at:.1f} s")
        infos = [harness.wait(job, timeout=150) for job in jobs]
        assert [i["state"] for i in infos] == ["done"] * 4, infos
        for n, info in enumerate(infos):
            output = harness.outputs / f"restart-{n}.mp4"
            assert info["outputs"] == [str(output)]
            assert abs(video_frame_count(output) - 539) <= 2, output
            assert (harness.outputs / f"restart-{n}.mp4.manifest.json").exists()
        assert not list(harness.outputs.glob("*.v2.*"))
        print("attempts per job:", [i["attempts"] for i in infos],
              "total seconds:", [i["timings"]["total_s"] for i in infos])
    finally:
        with contextlib.suppress(Exception):
            harness.cleanup()
    assert FRAME > 0
