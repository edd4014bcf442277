"""``melter serve`` as a real process against real Redis: the Janus event handler endpoint, the
jobs API, callbacks and metrics; ``melter watch`` as a real process.

Janus's events are the ones a real Janus sent during the fixture meetings (``events.jsonl``),
replayed over HTTP: in order, shuffled, duplicated, and with the service killed (SIGKILL) and
started again in the middle. Each time, each room gets exactly one render job.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from melter.farm.callbacks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from melter.farm.jobs import Farm
from melter.serve.config import load_settings
from melter.serve.renders import start_label
from melter.serve.rooms import parse_events
from melter.serve.tracker import Tracker
from tests.farm.test_farm import meeting_span
from tests.helpers.farm import FRAME, FarmHarness
from tests.helpers.service import (
    CLI,
    MEETINGS,
    SECRET,
    SETTLE,
    TOKEN,
    Receiver,
    Service,
    copy_recordings,
    event_lines,
    farm,
    post_events,
    running_service,
    service_harness,
)

__all__ = ["farm"]  # the fixture, used by name

GRACE = 2.0


def jobs_by_room(service: Service) -> dict[str, list[dict[str, Any]]]:
    with service.client() as client:
        return {room: client.get("/jobs", params={"room": room}).json()
                for room in MEETINGS.values()}


def wait_for(condition: Any, timeout: float, what: str) -> float:
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - began


# -- must show 2: one render per room, whatever the replay ------------------------------------
def replay_plan(scenario: str, rng: random.Random) -> list[str]:
    if scenario == "in-order":
        return [line for name in MEETINGS for line in event_lines(name)]
    lines = [line for name in MEETINGS for line in event_lines(name)]
    if scenario in ("duplicated", "restart"):
        lines = [line for line in lines for _ in range(2)] + lines
    if scenario != "duplicated":
        rng.shuffle(lines)
    return lines


@pytest.mark.parametrize("scenario", ["in-order", "shuffled", "duplicated", "restart"])
def test_replayed_janus_events_render_each_room_once(farm: FarmHarness, scenario: str) -> None:
    copy_recordings(farm, list(MEETINGS))
    config = farm.base / "farm.toml"  # room 2003 renders its own way
    config.write_text('[service.rooms."2003"]\nlayout = "%s"\n'
                      'outputs = [{ name = "turns/{room}-{start}.mp4" }]\n'
                      % (farm.storage / "layouts" / "small.yaml"))
    farm.env["MELTER_CONFIG"] = str(config)
    rng = random.Random(scenario)
    lines = replay_plan(scenario, rng)
    service = Service(farm)
    service.start()
    try:
        half = len(lines) // 2
        post_events(service, lines[:half], rng if scenario != "in-order" else None)
        if scenario == "restart":
            service.kill()
            service.start()
        post_events(service, lines[half:], rng if scenario != "in-order" else None)
        wait_for(lambda: sum(len(v) for v in jobs_by_room(service).values()) >= 3, 20,
                 "three render jobs")
        time.sleep(GRACE + 1)  # anything else due would have been submitted by now
        found = jobs_by_room(service)
    finally:
        service.stop()
    print(f"{scenario}: {len(lines)} event posts, service started {service.starts}x; jobs per "
          f"room {dict(sorted((room, len(jobs)) for room, jobs in found.items()))}")
    assert {room: len(jobs) for room, jobs in found.items()} == {
        "2001": 1, "2002": 1, "2003": 1}, service.text()[-3000:]
    assert len(Farm(farm.config).jobs(limit=100)) == 3
    for name, room in MEETINGS.items():
        job = found[room][0]
        expected = sorted(p.name for p in (FIXTURES_DIR / name).glob("*.mjr"))
        assert sorted(Path(p).name for p in job["spec"]["inputs"]) == expected
        assert job["spec"]["room"] == room and job["priority"] == "auto"
        assert job["metadata"]["trigger"] == "janus"
        output = Path(job["outputs"][0])
        start = start_label(int(job["metadata"]["meeting"].rsplit("-", 1)[1]))
        if room == "2003":
            assert output.parent == farm.storage / "renders" / "turns"
            assert output.name == f"2003-{start}.mp4"
        else:
            assert output.parent == farm.storage / "renders"
            assert output.name == f"room-{room}-{start}.mp4"
    tracker = Tracker(load_settings(farm.env), Farm(farm.config))
    assert tracker.stats()["auto_submitted"] == 3
    if scenario in ("in-order", "duplicated"):
        assert all(j["metadata"]["ended_by"] == "destroyed" for v in found.values() for j in v)
    if scenario == "restart":
        assert service.starts == 2


FIXTURES_DIR = Path(__file__).parent.parent / "fixtures"


def test_everyone_gone_renders_after_the_grace_period(farm: FarmHarness) -> None:
    copy_recordings(farm, ["dev-two-party-h264"])
    lines = event_lines("dev-two-party-h264")
    destroyed = [x for x in lines if '"destroyed", "room"' in x]
    assert len(destroyed) == 1
    with running_service(farm) as service:
        post_events(service, [x for x in lines if x not in destroyed])
        last = time.monotonic()
        wait_for(lambda: len(jobs_by_room(service)["2002"]) == 1, 10, "the render")
        waited = time.monotonic() - last
        post_events(service, destroyed)  # the room's destroy after the grace close
        time.sleep(1.0)
        jobs = jobs_by_room(service)["2002"]
    # enqueued once the grace period and the settling time passed, within a tick or two
    assert GRACE + SETTLE <= waited <= GRACE + SETTLE + 1.5, waited
    assert len(jobs) == 1 and jobs[0]["metadata"]["ended_by"] == "empty"


def test_a_grace_period_running_while_the_service_is_down_is_not_lost(
        farm: FarmHarness) -> None:
    """Everyone leaves, the service is killed before the grace period ends and comes back
    after it: the deadline was in Redis, so the render is queued at once, once."""
    copy_recordings(farm, ["dev-two-party-h264"])
    lines = [x for x in event_lines("dev-two-party-h264") if '"destroyed", "room"' not in x]
    service = Service(farm)
    service.start()
    try:
        post_events(service, lines)
        left = time.monotonic()
        service.kill()
        assert Farm(farm.config).jobs() == []
        time.sleep(max(0.0, GRACE + 0.5 - (time.monotonic() - left)))
        service.start()
        back = time.monotonic()
        wait_for(lambda: len(jobs_by_room(service)["2002"]) == 1, 10, "the render")
        queued_after = time.monotonic() - back
        time.sleep(GRACE)
        jobs = Farm(farm.config).jobs()
    finally:
        service.stop()
    assert len(jobs) == 1 and jobs[0]["metadata"]["ended_by"] == "empty"
    assert queued_after <= SETTLE + 1.5, queued_after


def test_a_restart_between_decision_and_submission_loses_and_doubles_nothing(
        farm: FarmHarness) -> None:
    """The meeting's end is stored before its job is submitted; a tracker that starts again
    submits what is pending, and a job that did reach the farm is found again, not doubled."""
    copy_recordings(farm, ["dev-two-party-h264", "dev-three-party-vp8"])
    settings = load_settings(farm.env)
    first = Tracker(settings, Farm(farm.config))
    events = [e for name in ("dev-two-party-h264", "dev-three-party-vp8")
              for line in event_lines(name) for e in parse_events(json.loads(line))]
    later = time.time() + 60  # the events' wall clock: a minute ahead, for a steady test
    ended = first.handle(events, now=later)
    assert len(ended) == 2
    # the service died before submitting; for room 2001 it had reached the farm already
    pending = first.room("2001")
    assert pending is not None
    spec = first._spec(pending, pending.meetings[0])
    early = Farm(farm.config).submit(spec)
    again = Tracker(settings, Farm(farm.config))
    assert again.submit_pending(later + SETTLE - 0.01) == []  # Janus may be closing files
    jobs = again.submit_pending(later + SETTLE)
    assert len(jobs) == 2 and early in jobs
    assert again.submit_pending(later + SETTLE) == []
    assert len(Farm(farm.config).jobs(limit=100)) == 2


# -- must show 3: the API ----------------------------------------------------------------------
def test_api_refuses_without_a_token_and_outside_the_storage_root(farm: FarmHarness) -> None:
    meeting = farm.meeting("dev-two-party-h264")
    layout = str(farm.storage / "layouts" / "small.yaml")
    good = {"inputs": [str(meeting)], "layout": layout,
            "outputs": [{"path": "out/two.mp4"}], "room": "2002"}
    with running_service(farm) as service:
        anonymous = service.client(token=None)
        wrong = service.client(token="not-the-token")
        client = service.client()
        for method, path in [("GET", "/jobs"), ("GET", "/jobs/x"), ("DELETE", "/jobs/x"),
                             ("POST", "/jobs"), ("POST", "/jobs/x/rerender"),
                             ("GET", "/layouts")]:
            for who in (anonymous, wrong):
                reply = who.request(method, path, json=good if method == "POST" else None)
                print(f"{method} {path} token={'wrong' if who is wrong else 'none'}: "
                      f"{reply.status_code} {reply.json()['error']}")
                assert reply.status_code == 401, (method, path, reply.text)
                assert "token" in reply.json()["error"]
                assert reply.headers["www-authenticate"] == "Bearer"
        assert len(Farm(farm.config).jobs()) == 0  # nothing was queued
        # paths outside the storage root
        for inputs, outputs in [(["/etc"], "out/x.mp4"), ([str(meeting)], "/tmp/x.mp4"),
                                (["../../etc"], "out/x.mp4"),
                                ([str(meeting)], "out/../../x.mp4")]:
            reply = client.post("/jobs", json={**good, "inputs": inputs,
                                               "outputs": [{"path": outputs}]})
            print(f"inputs {inputs} output {outputs}: {reply.status_code} {reply.json()['error']}")
            assert reply.status_code == 400, reply.text
            assert "outside the storage root" in reply.json()["error"]
            assert "MELTER_STORAGE_ROOT" in reply.json()["error"]
        # errors a person can act on, as JSON
        reply = client.post("/jobs", json={"inputs": [str(meeting)]})
        assert reply.status_code == 422 and "outputs: Field required" in reply.json()["error"]
        reply = client.get("/jobs/0123456789abcdef")
        assert reply.status_code == 404 and "GET /jobs" in reply.json()["error"]
        reply = client.post("/jobs", json={**good, "layout": "no-such-layout"})
        assert reply.status_code == 400 and "no-such-layout" in reply.json()["error"]
        # a good job, listed, filtered by room, cancelled
        reply = client.post("/jobs", json=good)
        assert reply.status_code == 201, reply.text
        job = reply.json()["id"]
        assert [j["id"] for j in client.get("/jobs", params={"room": "2002"}).json()] == [job]
        assert client.get("/jobs", params={"room": "9999"}).json() == []
        assert client.get(f"/jobs/{job}").json()["state"] == "queued"
        reply = client.delete(f"/jobs/{job}")
        assert reply.status_code == 200 and reply.json()["state"] == "cancelled"
        # layouts, OpenAPI, health and metrics
        names = [x["name"] for x in client.get("/layouts").json()["builtin"]]
        assert {"grid", "speaker", "side-by-side"} <= set(names)
        assert anonymous.get("/docs").status_code == 200
        paths = anonymous.get("/openapi.json").json()["paths"]
        assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/rerender", "/layouts",
                "/janus/events", "/metrics", "/healthz"} <= set(paths)
        assert anonymous.get("/healthz").json() == {"ok": True}
        metrics = anonymous.get("/metrics").text
        assert 'melter_jobs{state="cancelled"} 1.0' in metrics
        assert 'melter_jobs{state="queued"} 0.0' in metrics
        assert "melter_workers 0.0" in metrics
        assert 'melter_queue_depth{queue="manual"}' in metrics
        assert "melter_render_seconds_count 0.0" in metrics
        for c in (anonymous, wrong, client):
            c.close()


def test_janus_endpoint_basic_auth(tmp_path: Path) -> None:
    harness = service_harness(tmp_path, MELTER_JANUS_USER="janus",
                              MELTER_JANUS_PASSWORD="pw-5521")
    try:
        with running_service(harness) as service:
            line = next(x for x in event_lines("dev-two-party-h264") if '"type": 64' in x)
            url = f"{service.url}/janus/events"
            assert httpx.post(url, content=line).status_code == 401
            assert httpx.post(url, content=line, auth=("janus", "wrong")).status_code == 401
            reply = httpx.post(url, content=line, auth=("janus", "pw-5521"))
            assert reply.status_code == 200 and reply.json()["videoroom"] == 1
            packed = zlib.compress(("[" + line + "," + line + "]").encode())  # compress = true
            reply = httpx.post(url, content=packed, auth=("janus", "pw-5521"))
            assert reply.status_code == 200 and reply.json()["videoroom"] == 2
            reply = httpx.post(url, content="{not json", auth=("janus", "pw-5521"))
            assert reply.status_code == 400 and "JSON" in reply.json()["error"]
    finally:
        harness.cleanup()


def frame_at(path: Path, seconds: float) -> tuple[int, int, list[float]]:
    """Width, height and median RGB (the background, not the white text on it) of the middle
    of the frame shown at ``seconds``."""
    import av
    import numpy as np

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if frame.pts is not None and float(frame.pts * frame.time_base) >= seconds:
                image = frame.to_ndarray(format="rgb24")
                h, w = image.shape[:2]
                middle = image[h // 4:3 * h // 4, w // 4:3 * w // 4].reshape(-1, 3)
                return w, h, [float(v) for v in np.median(middle, axis=0)]
    raise AssertionError(f"{path}: no frame at {seconds} s")


def duration(path: Path) -> float:
    import av

    with av.open(str(path)) as container:
        return float(container.duration or 0) / 1e6


# -- must show 3 and 4: a re-render beside the first; signed callbacks, retried ---------------
def test_rerender_writes_a_second_version_with_signed_callbacks(farm: FarmHarness) -> None:
    meeting = farm.meeting("dev-two-party-h264")
    small = str(farm.storage / "layouts" / "small.yaml")
    square = {"name": "square", "canvas": {"width": 240, "height": 240, "fps": 30},
              "labels": {"enabled": False},
              "regions": [{"name": "grid", "max_rows": 4, "max_columns": 4, "fit": "crop"}]}
    receiver = Receiver(failures=2)
    farm.start_worker("w1")
    try:
        with running_service(farm) as service, service.client() as client:
            reply = client.post("/jobs", json={
                "inputs": [str(meeting)], "layout": small, "room": "2002",
                "outputs": [{"path": "out/two.mp4"}], "callback_url": receiver.url})
            assert reply.status_code == 201, reply.text
            first = reply.json()["id"]
            wait_for(lambda: client.get(f"/jobs/{first}").json()["state"] == "done", 120,
                     "the first render")
            reply = client.post(f"/jobs/{first}/rerender", json={"layout": square})
            assert reply.status_code == 201, reply.text
            second = reply.json()["id"]
            assert second != first and reply.json()["rerender_of"] == first
            wait_for(lambda: client.get(f"/jobs/{second}").json()["state"] == "done", 120,
                     "the re-render")
            for job in (first, second):
                wait_for(lambda job=job: [c["state"] for c in receiver.accepted()
                                          if c["id"] == job][-1:] == ["done"], 20,
                         "the callbacks")
            listed = client.get("/jobs", params={"room": "2002"}).json()
            metrics = client.get("/metrics").text
            firsts = client.get(f"/jobs/{first}").json()
            seconds = client.get(f"/jobs/{second}").json()
    finally:
        receiver.close()
    # the second version beside the first
    out = farm.storage / "out"
    assert firsts["outputs"] == [str(out / "two.mp4")]
    assert seconds["outputs"] == [str(out / "two.v2.mp4")]
    assert seconds["priority"] == "manual" and seconds["metadata"]["rerender_of"] == first
    assert {j["id"] for j in listed} == {first, second}
    one, two = duration(out / "two.mp4"), duration(out / "two.v2.mp4")
    span = meeting_span("dev-two-party-h264")  # first to last packet, from the manifest
    print(f"outputs: {sorted(p.name for p in out.iterdir() if p.suffix == '.mp4')}; "
          f"durations {one:.3f} s and {two:.3f} s, meeting span {span:.3f} s")
    assert abs(one - span) <= 2 * FRAME and abs(two - span) <= 2 * FRAME, (one, two, span)
    # at 2 s only X (teal) is in the meeting: it fills either canvas
    w1, h1, colour1 = frame_at(out / "two.mp4", 2.0)
    w2, h2, colour2 = frame_at(out / "two.v2.mp4", 2.0)
    assert (w1, h1, w2, h2) == (320, 180, 240, 240)
    for colour in (colour1, colour2):
        assert all(abs(c - t) < 25 for c, t in zip(colour, (20, 160, 160), strict=True)), colour
    # callbacks: every state change, in order, each signed; the first retried after 503s
    mine = [r for r in receiver.requests if json.loads(r["body"])["id"] == first]
    assert [r["answered"] for r in mine[:3]] == [503, 503, 200]
    assert mine[0]["body"] == mine[1]["body"] == mine[2]["body"]  # the same delivery again
    gaps = [mine[1]["at"] - mine[0]["at"], mine[2]["at"] - mine[1]["at"]]
    assert gaps[0] >= 0.3 and gaps[1] >= 0.6, gaps  # back-off 0.3 s, doubling
    accepted = [json.loads(r["body"]) for r in mine if r["answered"] == 200]
    verified = 0
    for request in receiver.requests:
        headers = {k.lower(): v for k, v in request["headers"].items()}
        verified += verify(SECRET, headers[TIMESTAMP_HEADER.lower()], request["body"],
                           headers[SIGNATURE_HEADER.lower()])
    print(f"tile at 2 s: {w1}x{h1} {colour1}, {w2}x{h2} {colour2}; first job's deliveries "
          f"answered {[r['answered'] for r in mine]}, gaps {[round(g, 2) for g in gaps]} s, "
          f"accepted {[(c['state'], c['sequence']) for c in accepted]}; "
          f"signatures verified {verified} of {len(receiver.requests)}")
    assert [c["state"] for c in accepted] == ["queued", "running", "done"]
    assert [c["sequence"] for c in accepted] == [1, 2, 3]
    for request in receiver.requests:
        headers = {k.lower(): v for k, v in request["headers"].items()}
        stamp, signature = headers[TIMESTAMP_HEADER.lower()], headers[SIGNATURE_HEADER.lower()]
        assert verify(SECRET, stamp, request["body"], signature)
        assert not verify("another-secret", stamp, request["body"], signature)
        assert not verify(SECRET, stamp, request["body"] + b" ", signature)
        assert not verify(SECRET, str(int(stamp) - 3600), request["body"], signature)
    assert firsts["callback"] == "delivered: HTTP 200"
    # metrics: the worker, both jobs done, two render times
    assert "melter_workers 1.0" in metrics
    assert 'melter_jobs{state="done"} 2.0' in metrics
    assert "melter_render_seconds_count 2.0" in metrics
    assert 'melter_queue_depth{queue="auto"} 0.0' in metrics
    # the re-render's callbacks too (it inherited the URL)
    assert [c["state"] for c in receiver.accepted() if c["id"] == second][-1:] == ["done"]


def test_callbacks_of_a_cancelled_job_without_a_worker(farm: FarmHarness) -> None:
    """queued then cancelled: both delivered by the service's own deliverer, signed."""
    meeting = farm.meeting("dev-two-party-h264")
    receiver = Receiver(failures=1)
    try:
        with running_service(farm) as service, service.client() as client:
            job = client.post("/jobs", json={
                "inputs": [str(meeting)], "outputs": [{"path": "out/c.mp4"}],
                "callback_url": receiver.url}).json()["id"]
            wait_for(lambda: len(receiver.accepted()) >= 1, 10, "the queued callback")
            assert client.delete(f"/jobs/{job}").json()["state"] == "cancelled"
            wait_for(lambda: len(receiver.accepted()) >= 2, 10, "the cancelled callback")
    finally:
        receiver.close()
    assert [c["state"] for c in receiver.accepted()] == ["queued", "cancelled"]
    assert receiver.accepted()[1]["previous"] == "queued"
    assert [r["answered"] for r in receiver.requests] == [503, 200, 200]


# -- the folder watcher ------------------------------------------------------------------------
def test_watch_renders_each_room_once_when_its_files_stop_growing(farm: FarmHarness) -> None:
    incoming = farm.storage / "incoming"
    incoming.mkdir()
    quiet = 1.5
    sources = [p for name in ("dev-two-party-h264", "dev-three-party-vp8")
               for p in sorted((FIXTURES_DIR / name).glob("*.mjr"))]

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", CLI, "watch", str(incoming),
                                 "--quiet-seconds", str(quiet)], env=farm.env,
                                stdout=(farm.base / "watch.log").open("a"),
                                stderr=subprocess.STDOUT)

    watcher = start()
    client = Farm(farm.config)
    try:
        # Janus writing: the files grow for three seconds
        for part in range(3):
            for path in sources:
                data = path.read_bytes()
                size = len(data) * (part + 1) // 3
                (incoming / path.name).write_bytes(data[:size])
            last_write = time.monotonic()
            if part < 2:
                time.sleep(1.0)
                assert client.jobs() == [], "rendered while the files still grew"
        wait_for(lambda: len(client.jobs()) == 2, 15, "two renders")
        waited = time.monotonic() - last_write
        # a watcher that starts again renders nothing twice
        watcher.kill()
        watcher.wait()
        watcher = start()
        time.sleep(quiet + 2)
        assert len(client.jobs()) == 2
        # the same room number again, an hour later: a new meeting, its files only
        later = []
        for path in sorted((FIXTURES_DIR / "dev-two-party-h264").glob("*.mjr")):
            parts = path.name.split("-")
            parts[4] = str(int(parts[4]) + 3_600_000_000)
            target = incoming / "-".join(parts)
            target.write_bytes(path.read_bytes())
            later.append(target.name)
        wait_for(lambda: len(client.jobs()) == 3, 15, "the later meeting's render")
        jobs = client.jobs()
    finally:
        watcher.kill()
        watcher.wait()
    assert quiet <= waited <= quiet + 3.0, waited
    rooms = sorted(j["spec"]["room"] for j in jobs)
    assert rooms == ["2001", "2002", "2002"]
    newest = jobs[0]
    assert sorted(Path(p).name for p in newest["spec"]["inputs"]) == sorted(later)
    assert all(j["metadata"]["trigger"] == "watch" for j in jobs)
    assert TOKEN  # the watcher needs no token: it submits to the farm directly


def test_two_service_replicas_sharing_redis_render_each_room_once(farm: FarmHarness) -> None:
    """Events split between two ``melter serve`` processes, posted at the same time: the
    rooms' transactions in Redis keep one order, so each room still ends once."""
    import threading

    copy_recordings(farm, list(MEETINGS))
    rng = random.Random("replicas")
    lines = replay_plan("restart", rng)  # shuffled and duplicated
    one, two = Service(farm), Service(farm)
    one.start()
    two.start()
    try:
        halves = [lines[0::2], lines[1::2]]
        threads = [threading.Thread(target=post_events, args=(s, part, random.Random(k)))
                   for k, (s, part) in enumerate(zip((one, two), halves, strict=True))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        wait_for(lambda: sum(len(v) for v in jobs_by_room(one).values()) >= 3, 20,
                 "three render jobs")
        time.sleep(GRACE + 1)
        found = jobs_by_room(two)
    finally:
        one.stop()
        two.stop()
    assert {room: len(jobs) for room, jobs in found.items()} == {
        "2001": 1, "2002": 1, "2003": 1}
    assert len(Farm(farm.config).jobs(limit=100)) == 3


def test_callbacks_are_given_up_after_their_attempts(tmp_path: Path) -> None:
    """A receiver that always fails gets ``MELTER_CALLBACK_ATTEMPTS`` tries, spaced by the
    back-off; one that refuses (4xx) is not asked again."""
    from melter.farm.callbacks import Outbox

    harness = service_harness(tmp_path, MELTER_CALLBACK_ATTEMPTS="3",
                              MELTER_CALLBACK_BACKOFF_SECONDS="0.2")
    failing, refusing = Receiver(failures=100), Receiver(failures=100, status=404)
    try:
        meeting = harness.meeting("dev-two-party-h264")
        outbox = Outbox(harness.farm)
        job = harness.submit(meeting, "a.mp4", callback_url=failing.url)
        began = time.monotonic()
        while time.monotonic() - began < 5 and len(failing.requests) < 3:
            outbox.deliver_due()
            time.sleep(0.05)
        time.sleep(1.0)
        outbox.deliver_due()
        status = harness.status(job)
        refused = harness.submit(meeting, "b.mp4", callback_url=refusing.url)
        outbox.deliver_due()
        time.sleep(0.5)
        outbox.deliver_due()
        refused_status = harness.status(refused)
    finally:
        failing.close()
        refusing.close()
        harness.cleanup()
    assert len(failing.requests) == 3
    gaps = [b["at"] - a["at"] for a, b in zip(failing.requests, failing.requests[1:],
                                               strict=False)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps
    assert status["callback"] == "failed: HTTP 503"
    assert outbox.pending(job) == []
    assert len(refusing.requests) == 1 and refused_status["callback"] == "failed: HTTP 404"

