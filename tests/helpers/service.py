"""Shared setup for the service tests (no tests here): a farm on its own Redis database with
a real ``melter serve`` process, Janus event replays, and a callback receiver.

The service tests use Redis database 12 (``MELTER_TEST_SERVICE_REDIS_DB``) under private key
prefixes, deleted afterwards.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers.farm import (
    REDIS_HOST,
    REDIS_PORT,
    SMALL_LAYOUT,
    FarmHarness,
    redis_available,
)

FIXTURES = Path(__file__).parent.parent / "fixtures"
MEETINGS = {"dev-three-party-vp8": "2001", "dev-two-party-h264": "2002",
            "dev-turn-taking-vp8": "2003"}
REDIS_DB = int(os.environ.get("MELTER_TEST_SERVICE_REDIS_DB", "12"))
TOKEN = "test-token-7f3a"
SECRET = "callback-secret-91c2"
CLI = "from melter.cli import main; main()"
SETTLE = 0.5


def service_redis_url() -> str:
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    if not redis_available(url):
        pytest.skip(f"no Redis at {url}")
    return url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[FarmHarness]:
    """A service farm (:func:`service_harness`), cleaned up after the test."""
    harness = service_harness(tmp_path)
    try:
        yield harness
    finally:
        harness.cleanup()


def service_harness(base: Path, **settings: str) -> FarmHarness:
    """A farm whose storage root holds the recordings folder and a small layout file."""
    storage = base / "storage"
    (storage / "recordings").mkdir(parents=True)
    (storage / "layouts").mkdir()
    (storage / "layouts" / "small.yaml").write_text(yaml.safe_dump(SMALL_LAYOUT))
    values = {
        "MELTER_RECORDINGS_DIR": str(storage / "recordings"),
        "MELTER_API_TOKEN": TOKEN,
        "MELTER_CALLBACK_SECRET": SECRET,
        "MELTER_CALLBACK_BACKOFF_SECONDS": "0.3",
        "MELTER_GRACE_SECONDS": "2",
        "MELTER_TICK_SECONDS": "0.2",
        "MELTER_SETTLE_SECONDS": str(SETTLE),
        # Prerenders while meetings go on: off, but in the tests about them.
        "MELTER_PRERENDER_SECONDS": "0",
        "MELTER_DEFAULT_LAYOUT": str(storage / "layouts" / "small.yaml"),
        **settings,
    }
    return FarmHarness(base, service_redis_url(), settings=values)


def copy_recordings(harness: FarmHarness, names: list[str]) -> Path:
    folder = harness.storage / "recordings"
    for name in names:
        for path in (FIXTURES / name).glob("*.mjr"):
            shutil.copy(path, folder / path.name)
    return folder


@dataclass
class Service:
    """A ``melter serve`` process."""

    harness: FarmHarness
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    starts: int = 0
    host: str = "127.0.0.1"  # --host; reached through 127.0.0.1 either way

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def peak_rss_mb(self) -> float:
        """The process's peak resident memory so far (VmHWM), MB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM")

    @property
    def log(self) -> Path:
        return self.harness.base / f"serve-{self.port}.log"

    def start(self, timeout: float = 30) -> float:
        """Start and wait for /healthz; seconds it took."""
        began = time.monotonic()
        handle = self.log.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-c", CLI, "serve", "--host", self.host, "--port", str(self.port)],
            env=self.harness.env, cwd=self.harness.base, stdout=handle,
            stderr=subprocess.STDOUT, start_new_session=True)
        handle.close()
        self.starts += 1
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return time.monotonic() - began
            if self.process.poll() is not None or time.monotonic() - began > timeout:
                raise AssertionError(f"melter serve did not start:\n{self.text()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as when a machine dies."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@contextlib.contextmanager
def running_service(harness: FarmHarness) -> Iterator[Service]:
    service = Service(harness)
    service.start()
    try:
        yield service
    finally:
        service.stop()


_SHIFT: list[int] = []


def event_shift() -> int:
    """µs added to the fixtures' event timestamps: the service drops events further than a day
    from its clock, as a Janus with a sane clock never sends, so a replay happens now (the
    latest event of all the fixture meetings is the moment of the first replay)."""
    if not _SHIFT:
        latest = max(int(m) for name in MEETINGS for m in re.findall(
            r'"timestamp": (\d+)', (FIXTURES / name / "events.jsonl").read_text()))
        _SHIFT.append((int(time.time()) * 1_000_000 - latest) // 1_000_000 * 1_000_000)
    return _SHIFT[0]


def event_lines(name: str) -> list[str]:
    """The fixture meeting's events as Janus posted them, moved to now (:func:`event_shift`)."""
    shift = event_shift()
    text = (FIXTURES / name / "events.jsonl").read_text()
    return [re.sub(r'"timestamp": (\d+)', lambda m: f'"timestamp": {int(m[1]) + shift}', line)
            for line in text.splitlines()]


def post_events(service: Service, lines: list[str], rng: random.Random | None = None) -> int:
    """POST events as Janus's handler does: one event each, or (with ``rng``) arrays of one
    to five. The number of POSTs."""
    posts = 0
    k = 0
    with httpx.Client(base_url=service.url, timeout=10) as client:
        while k < len(lines):
            size = rng.randint(1, 5) if rng else 1
            chunk = lines[k:k + size]
            body = chunk[0] if size == 1 else "[" + ",".join(chunk) + "]"
            reply = client.post("/janus/events", content=body,
                                headers={"Content-Type": "application/json"})
            assert reply.status_code == 200, reply.text
            posts += 1
            k += size
    return posts


class Receiver:
    """A local HTTP endpoint for callbacks that answers ``status`` (503) to its first
    ``failures`` requests, recording every request (headers, raw body, time)."""

    def __init__(self, failures: int = 0, status: int = 503) -> None:
        self.requests: list[dict[str, Any]] = []
        self.failures = failures
        self.status = status
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                fail = len(outer.requests) < outer.failures
                answer = outer.status if fail else 200
                outer.requests.append({"at": time.monotonic(), "body": body,
                                       "headers": dict(self.headers), "answered": answer})
                self.send_response(answer)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def accepted(self) -> list[dict[str, Any]]:
        return [json.loads(r["body"]) for r in self.requests if r["answered"] == 200]

    def close(self) -> None:
        self.server.shutdown()
