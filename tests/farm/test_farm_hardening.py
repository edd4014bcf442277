"""A job stays inside the storage root, and its callbacks go only where they may, in time.

Real Redis, real worker processes, real HTTP receivers. Each escape is tried the way a caller
(or someone who can write under the storage root) would try it, and the test measures what
the farm did: the refusal's text and time, which files exist outside the root (none), when a
slow receiver's delivery was cut off, and how late another job's callback arrived.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from melter.errors import MelterError
from melter.farm.callbacks import Outbox
from tests.helpers.farm import SMALL_LAYOUT, FarmHarness, harness, test_redis_url
from tests.helpers.service import running_service, service_harness

__all__ = ["harness"]  # the fixture, imported for pytest

PASSWD_LINE = "root:x:0:0"


def files_under(folder: Path) -> list[str]:
    """Every entry below ``folder`` (links not followed), relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def refusal(harness: FarmHarness, **spec: Any) -> tuple[str, float]:
    """The one-line error a submit is refused with, and how long the refusal took."""
    began = time.monotonic()
    with pytest.raises(MelterError) as caught:
        harness.farm.submit(spec)
    return str(caught.value), time.monotonic() - began


# -- paths -------------------------------------------------------------------------------------
def test_layouts_naming_files_outside_the_root_are_refused_at_submit(
        harness: FarmHarness) -> None:
    meeting = harness.meeting("dev-two-party-h264")
    storage = harness.storage
    base = {"inputs": [str(meeting)], "outputs": [{"path": str(harness.outputs / "x.mp4")}]}

    def with_rule(target: str) -> dict[str, Any]:
        return {**SMALL_LAYOUT, "rules": [{"when": "always", "layout": target}]}

    (storage / "layouts").mkdir()
    (storage / "layouts" / "zero.yaml").symlink_to("/dev/zero")
    (storage / "layouts" / "passwd.yaml").symlink_to("/etc/passwd")
    os.mkfifo(storage / "layouts" / "fifo.yaml")
    (storage / "layouts" / "big.yaml").write_text("# padding\n" * 200_000)  # 2 MB
    (storage / "layouts" / "broken.yaml").write_text("regions: [\n  secret-value: {\n")
    cases = {
        "/etc/passwd": "outside the storage root",
        "/dev/zero": "outside the storage root",
        "../../../../../../etc/passwd": "outside the storage root",
        "layouts/passwd.yaml": "outside the storage root",
        "layouts/zero.yaml": "outside the storage root",
        "layouts/fifo.yaml": "not a regular file",
        "layouts/big.yaml": "more than the 1048576 allowed",
        "layouts/broken.yaml": "not valid YAML at line 3",
        "passwd": "no built-in layout named 'passwd'",
    }
    print()
    for target, expected in cases.items():
        message, seconds = refusal(harness, **base, layout=with_rule(target))
        print(f"rule layout {target}: {seconds * 1000:.1f} ms: {message}")
        assert expected in message, message
        assert "\n" not in message and PASSWD_LINE not in message and "secret-value" not in message
        assert seconds < 1.0
    # The job's own layout: a file outside, or a bare name, which is a built-in or nothing
    # (never a file in the current folder of the process that reads it).
    for layout, expected in [("/etc/passwd", "outside the storage root"),
                             ("layouts/zero.yaml", "outside the storage root"),
                             ("passwd", "no such built-in layout")]:
        cwd = os.getcwd()
        os.chdir("/etc")
        try:
            message, seconds = refusal(harness, **base, layout=layout)
        finally:
            os.chdir(cwd)
        print(f"layout {layout} (cwd /etc): {seconds * 1000:.1f} ms: {message}")
        assert expected in message and PASSWD_LINE not in message and "\n" not in message
    # A background image is read by melt: a regular file under the root, or refused.
    message, _ = refusal(harness, **base, layout={
        **SMALL_LAYOUT, "canvas": {**SMALL_LAYOUT["canvas"], "background_image": "/etc/passwd"}})
    assert "background_image /etc/passwd: is outside the storage root" in message
    assert harness.farm.jobs() == []  # nothing was queued
    # The CLI says the same in one line, exit code 1.
    done = harness.run_cli("submit", str(meeting), "-o", str(harness.outputs / "y.mp4"),
                           "--layout", "passwd", check=False)
    print(f"melter submit --layout passwd: exit {done.returncode}: {done.stderr.strip()}")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "no such built-in layout" in done.stderr


def test_rule_layouts_are_resolved_at_submit_and_linked_recordings_skipped_on_the_worker(
        harness: FarmHarness) -> None:
    """A rule layout file under the root is read once, at submit (the worker renders with it
    after the file is gone); a recording swapped for a link out of the root after submit is
    not read by the worker: the job renders without it, and says so."""
    meeting = harness.meeting("dev-two-party-h264")
    side = {**SMALL_LAYOUT, "name": "side", "regions": [
        {"name": "left", "width": "50%", "max_rows": 1, "max_columns": 1},
        {"name": "right", "x": "50%", "width": "50%", "max_rows": 1, "max_columns": 1}]}
    (harness.storage / "layouts").mkdir()
    (harness.storage / "layouts" / "side.yaml").write_text(yaml.safe_dump(side))
    layout = {**SMALL_LAYOUT, "rules": [{"when": "always", "layout": "layouts/side.yaml"}]}
    job = harness.submit(meeting, "linked.mp4", layout=layout, max_attempts=1)
    (harness.storage / "layouts" / "side.yaml").unlink()
    outside = harness.base / "outside"
    outside.mkdir()
    moved = sorted(meeting.glob("videoroom-2002-user-512-*.mjr"))
    assert len(moved) == 2
    for path in moved:
        path.rename(outside / path.name)
        path.symlink_to(outside / path.name)
    # Submitting the folder now is refused, naming the link.
    message, _ = refusal(harness, inputs=[str(meeting)], layout=SMALL_LAYOUT,
                         outputs=[{"path": str(harness.outputs / "again.mp4")}])
    print(f"\nsubmit with a linked recording: {message}")
    assert "links outside the storage root" in message and "user-512" in message
    before = {p.name: p.stat().st_atime_ns for p in outside.iterdir()}
    harness.start_worker("w1")
    info = harness.wait(job, timeout=120)
    assert info["state"] == "done", info
    manifest = json.loads((harness.outputs / "linked.mp4.manifest.json").read_text())
    participants = manifest["meeting"]["participants"]
    hashed = [Path(i["path"]).name for i in manifest["inputs"]]
    print(f"participants rendered: {participants}; inputs hashed: {len(hashed)}")
    assert len(participants) == 1
    assert not any("user-512" in name for name in hashed)
    assert {p.name: p.stat().st_atime_ns for p in outside.iterdir()} == before
    assert [r["layout"] for r in manifest["layout"]["document"]["rules"]] == [
        "layouts/side.yaml"]
    # The rule's layout (read at submit, deleted since) is in force: the one participant left
    # fills the left half; the right half is the black background.
    halves = half_lumas(harness.outputs / "linked.mp4")
    print(f"mean luma, left half {halves[0]:.1f}, right half {halves[1]:.1f}")
    assert halves[1] < 20 < halves[0]


def half_lumas(path: Path) -> tuple[float, float]:
    """Mean luma of the left and right halves of the middle frame."""
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="gray") for f in container.decode(video=0)]
    middle = frames[len(frames) // 2]
    width = middle.shape[1]
    return float(middle[:, : width // 2].mean()), float(middle[:, width // 2:].mean())


def test_an_output_folder_swapped_for_a_link_fails_the_job_and_writes_nothing_outside(
        harness: FarmHarness) -> None:
    meeting = harness.meeting("dev-two-party-h264")
    outside = harness.base / "outside"
    outside.mkdir()
    sub = harness.outputs / "sub"
    sub.mkdir()
    # 1: swapped after submit, before a worker takes the job.
    job = harness.submit(meeting, "sub/after-submit.mp4", max_attempts=1)
    sub.rename(harness.outputs / "sub-real")
    sub.symlink_to(outside, target_is_directory=True)
    harness.start_worker("w1")
    info = harness.wait(job, timeout=60)
    print(f"\nswapped after submit: {info['state']}: {info['error']}")
    assert info["state"] == "failed" and "sub is a symbolic link" in info["error"]
    assert files_under(outside) == []
    assert files_under(harness.outputs / "sub-real") == []
    # 2: swapped while melt renders into the scratch folder beside the output.
    sub.unlink()
    (harness.outputs / "sub-real").rename(sub)
    job = harness.submit(meeting, "sub/while-rendering.mp4", max_attempts=1)
    harness.wait_until(lambda: harness.status(job)["stage"] == "rendering", 60, "rendering")
    sub.rename(harness.outputs / "sub-real")
    sub.symlink_to(outside, target_is_directory=True)
    swapped = time.monotonic()
    info = harness.wait(job, timeout=120)
    print(f"swapped while rendering: {info['state']} {time.monotonic() - swapped:.1f} s "
          f"later: {info['error']}")
    assert info["state"] == "failed" and "sub is a symbolic link" in info["error"]
    assert files_under(outside) == []
    real = harness.outputs / "sub-real"
    assert not (real / "while-rendering.mp4").exists()
    assert not (real / "while-rendering.mp4.manifest.json").exists()
    print(f"left in the real folder (inside the root): {files_under(real)}")


# -- callbacks ---------------------------------------------------------------------------------
class Receiver:
    """An HTTP endpoint recording each POST's arrival time and body; ``status`` and
    ``location`` make it answer something else than 204."""

    def __init__(self, status: int = 204, location: str | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append({"at": time.time(), "body": json.loads(body)})
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Drip:
    """A receiver that reads the request, then answers one byte every ``every`` seconds,
    and notes when each connection was opened and when the caller hung up."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self.connections: list[dict[str, float | None]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/slow"
        self.stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            record: dict[str, float | None] = {"opened": time.time(), "closed": None}
            self.connections.append(record)
            threading.Thread(target=self._serve, args=(conn, record), daemon=True).start()

    def _serve(self, conn: socket.socket, record: dict[str, float | None]) -> None:
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        sent = 0
        next_byte = time.monotonic()
        conn.settimeout(0.05)
        with conn:
            while not self.stopping.is_set():
                if time.monotonic() >= next_byte and sent < len(answer):
                    with contextlib.suppress(OSError):
                        conn.sendall(answer[sent:sent + 1])
                    sent += 1
                    next_byte += self.every
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    record["closed"] = time.time()
                    return

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()


def test_a_dripping_receiver_is_cut_off_at_10_s_and_delays_no_other_job(tmp_path: Path) -> None:
    """Job A's receiver answers one byte every 5 s; its delivery ends at the 10 s deadline, and
    job B's callback, made while A's is held up, arrives within 2 s."""
    farm = FarmHarness(tmp_path, test_redis_url(), settings={"MELTER_CALLBACK_ATTEMPTS": "1"})
    drip, fast = Drip(every=5.0), Receiver()
    try:
        farm.start_worker("w1")
        meeting = farm.meeting("dev-two-party-h264")
        stand_in = {"stand_in": {"seconds": 0}}
        a = farm.submit(meeting, "a.mp4", callback_url=drip.url, **stand_in)
        farm.wait_until(lambda: len(drip.connections) >= 1, 10, "A's first callback")
        b_submitted = time.time()
        b = farm.submit(meeting, "b.mp4", callback_url=fast.url, **stand_in)
        farm.wait_until(lambda: len(fast.requests) >= 1, 10, "B's first callback")
        b_late = fast.requests[0]["at"] - b_submitted
        farm.wait_until(lambda: len(fast.requests) >= 3, 20, "B's callbacks")
        farm.wait_until(lambda: drip.connections[0]["closed"] is not None, 20, "the cut-off")
        first = drip.connections[0]
        held = float(first["closed"] or 0) - float(first["opened"] or 0)
        farm.wait_until(lambda: (farm.status(a)["callback"] or "").startswith("failed"), 15,
                        "A's callback given up")
        a_status, b_status = farm.status(a)["callback"], farm.status(b)["callback"]
    finally:
        drip.close()
        fast.close()
        farm.cleanup()
    print(f"\nB's first callback {b_late:.2f} s after its submit, while A's was held; "
          f"A's delivery cut off after {held:.2f} s")
    print(f"status: A {a_status!r}, B {b_status!r}")
    assert [r["body"]["state"] for r in fast.requests] == ["queued", "running", "done"]
    assert b_late < 2.0
    assert 9.5 <= held <= 11.0
    assert a_status == "failed: no HTTP answer within 10 s"
    assert b_status == "delivered: HTTP 204"


def test_redirects_are_not_followed(harness: FarmHarness) -> None:
    target = Receiver()
    redirector = Receiver(status=302, location=target.url)
    try:
        meeting = harness.meeting("dev-two-party-h264")
        job = harness.submit(meeting, "r.mp4", callback_url=redirector.url)
        outbox = Outbox(harness.farm)
        began = time.monotonic()
        while time.monotonic() - began < 5 and not harness.status(job)["callback"]:
            outbox.deliver_due()
            time.sleep(0.05)
        status = harness.status(job)["callback"]
    finally:
        target.close()
        redirector.close()
    print(f"\nredirect: {len(redirector.requests)} request(s) to the redirector, "
          f"{len(target.requests)} to its target; status {status!r}")
    assert len(redirector.requests) == 1 and target.requests == []
    assert status == "failed: HTTP 302, redirects are not followed"


def test_the_callback_allow_list_refuses_other_hosts_at_submit(tmp_path: Path) -> None:
    farm = service_harness(tmp_path, MELTER_CALLBACK_ALLOW="127.0.0.2, hooks.example.org, "
                           "10.20.0.0/16")
    try:
        meeting = farm.meeting("dev-two-party-h264")
        refused = ["http://127.0.0.1:6379/", "http://localhost:8080/x",
                   "http://169.254.169.254/latest/meta-data/", "http://[::1]:22/",
                   "https://10.21.0.1/hook", "http://hooks.example.org.evil.test/"]
        print()
        for url in refused:
            message, seconds = refusal(farm, inputs=[str(meeting)], layout=SMALL_LAYOUT,
                                       outputs=[{"path": str(farm.outputs / "c.mp4")}],
                                       callback_url=url)
            print(f"{url}: {seconds * 1000:.1f} ms: {message}")
            assert "not allowed (MELTER_CALLBACK_ALLOW)" in message or "does not resolve" in \
                message
            assert "\n" not in message
        assert farm.farm.jobs() == []
        # Listed: a name (not resolved), an address of a listed network.
        for url in ["https://hooks.example.org/melter", "http://10.20.3.4:8080/hook"]:
            assert farm.submit(meeting, "ok.mp4", callback_url=url)
        # The CLI: exit code 1, one line.
        done = farm.run_cli("submit", str(meeting), "-o", str(farm.outputs / "cli.mp4"),
                            "--callback-url", "http://127.0.0.1:6379/", check=False)
        print(f"melter submit: exit {done.returncode}: {done.stderr.strip()}")
        assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
        assert "not allowed (MELTER_CALLBACK_ALLOW)" in done.stderr
        # The HTTP API: 400, one line.
        with running_service(farm) as service:
            reply = service.client().post("/jobs", json={
                "inputs": [str(meeting)], "layout": SMALL_LAYOUT,
                "outputs": [{"path": "out/api.mp4"}], "callback_url": "http://127.0.0.1:22/"})
        print(f"POST /jobs: {reply.status_code}: {reply.json()['error']}")
        assert reply.status_code == 400
        assert "not allowed (MELTER_CALLBACK_ALLOW)" in reply.json()["error"]
    finally:
        farm.cleanup()
