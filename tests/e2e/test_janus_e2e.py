"""A real Janus 1.1.2 records a VideoRoom meeting from aiortc publishers; Melter renders it.

Janus runs in a network namespace (see ``janus_e2e``). The meeting: X (teal, 350 Hz) from the
start to the room's destroy at 12 s; Y (magenta, 500 Hz) joins at 2 s, unpublishes at 7 s and
leaves at 8 s; Z (yellow, 750 Hz) joins at 4 s and leaves at 10 s while publishing.

* ``test_recorded_meeting_renders``: the sample event handler posts to a receiver in the test;
  the events and recordings are checked, then ``melter render`` is run on the recordings.
* ``test_meeting_video_appears_on_storage``: the sample event handler posts (gzip-compressed)
  to a real ``melter serve``, with a real farm worker: the meeting's video must appear on
  storage with no further action.
* ``test_a_long_meeting_is_on_storage_within_15_s_of_its_destroy``: a meeting of 3 min 5 s
  through ``melter serve`` and two workers, which render it while it goes on (prerenders):
  the video must be on storage within 15 s of the room's destroy, made mostly of chunks
  rendered during the meeting.

Both measure the video against what the publishers sent, by wall clock: its length, each
participant's colour in its tile while publishing, and each tone's level and frequency.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers.janus_e2e import (
    EventReceiver,
    Janus,
    Link,
    Measured,
    MeetingLog,
    NamespaceError,
    Person,
    event_counts,
    measure,
    melter_env,
    melter_service,
    network_namespace,
    run_meeting,
    serve_available,
    skip_reason,
    summary,
)

REASON = skip_reason()
EVENTS_USER, EVENTS_PASSWORD = "janus", "e2e-" + secrets.token_hex(6)
REDIS_URL = os.environ.get("MELTER_TEST_JANUS_REDIS_URL", "redis://127.0.0.1:6379/13")
#: From the room's destroy to the video on storage: grace period, queue and render.
STORAGE_TIMEOUT = 180.0

pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
    pytest.mark.timeout(600),
]


@pytest.fixture(scope="module")
def link() -> Iterator[Link]:
    with contextlib.ExitStack() as stack:
        try:
            made = stack.enter_context(network_namespace())
        except NamespaceError as exc:
            pytest.skip(f"cannot make a network namespace for Janus here: {exc}")
        yield made


@pytest.fixture
def janus_for(link: Link, tmp_path: Path) -> Iterator[Callable[..., Janus]]:
    """Starts Janus with its event handler posting to a given URL (with basic auth, and
    compressed if asked); stops it afterwards."""
    started: list[Janus] = []

    def start(backend: str, compress: bool = False) -> Janus:
        janus = Janus(link, tmp_path / f"janus{len(started)}", backend, EVENTS_USER,
                      EVENTS_PASSWORD, events_compress=compress)
        janus.workdir.mkdir()
        started.append(janus)
        janus.start()
        return janus

    yield start
    for janus in started:
        janus.stop()


def redis_available(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def meet(janus: Janus, rec_dir: Path, **schedule: Any) -> MeetingLog:
    """Run the meeting (the default one, or ``people`` and ``destroy_at``); a failure shows
    the end of Janus's log."""
    try:
        return asyncio.run(run_meeting(janus.url, rec_dir, **schedule))
    except Exception as exc:
        raise AssertionError(f"the meeting failed: {exc!r}\n--- janus.log:\n"
                             f"{janus.log_tail()}") from exc


def check_local(log: MeetingLog, link: Link) -> None:
    """Janus offered candidates on its end of the veth pair only: media stayed on this host."""
    for sent in log.sent:
        assert sent.janus_candidates, sent.person.name
        assert set(sent.janus_candidates) == {link.janus_ip}, sent.janus_candidates


def check_rendering(m: Measured, log: MeetingLog) -> None:
    """The rendering shows the meeting as the publishers sent it."""
    frame = 1 / m.fps
    # First media sent to the room's destroy; the output has whole frames.
    assert abs(m.video_s - log.length) <= 2 * frame, (m.video_s, log.length)
    assert abs(m.audio_s - log.length) <= 2 * frame, (m.audio_s, log.length)
    for sent in log.sent:
        person = sent.person
        samples = m.tiles[person.name]
        assert len(samples) == 3, (person.name, samples)
        for t, rgb in samples:
            error = np.abs(np.array(rgb) - np.array(person.rgb)).max()
            assert error < 30, f"{person.name} at {t:.2f} s: tile {rgb}, sent {person.rgb}"
        for t, shown in m.absent[person.name]:
            assert str(person.pid) not in shown, f"{person.name} has a tile at {t:.2f} s"
            for rgb in shown.values():
                assert np.abs(np.array(rgb) - np.array(person.rgb)).max() > 30, (person.name, t)
        inside, outside = m.tone_levels[person.name]
        # Sent at 0.3 of full scale; silence outside its presence.
        assert 0.2 < inside < 0.4, (person.name, inside)
        assert outside < 0.01, (person.name, outside)
    assert sum(len(v) for v in m.absent.values()) > 0, "no frame without a participant checked"
    tones = sorted(s.person.tone for s in log.sent)
    assert np.allclose(sorted(m.peaks), tones, atol=2.0), (m.peaks, tones)


def test_recorded_meeting_renders(
    link: Link, janus_for: Callable[..., Janus], tmp_path: Path
) -> None:
    rec_dir = tmp_path / "recordings"
    rec_dir.mkdir()
    with EventReceiver(link.host_ip, user=EVENTS_USER, password=EVENTS_PASSWORD) as receiver:
        janus = janus_for(receiver.url)
        log = meet(janus, rec_dir)
        wait_for(lambda: "destroyed" in receiver.videoroom(log.room), 10, "the destroyed event")
    check_local(log, link)
    counts = event_counts(receiver.events)
    sequence = receiver.videoroom(log.room)
    assert sequence[0] == "created" and sequence[-1] == "destroyed", sequence
    for name, expected in (("joined", 3), ("published", 3), ("unpublished", 2),
                           ("leaving", 2), ("destroyed", 1)):
        assert sequence.count(name) == expected, (name, sequence)
    for kind in ("session", "handle", "jsep", "webrtc"):
        assert counts.get(kind, 0) > 0, counts
    assert receiver.refused == 0

    files = sorted(p.name for p in rec_dir.glob("*.mjr"))
    pattern = re.compile(rf"videoroom-{log.room}-user-(\d+)-\d+-(audio-0|video-1)\.mjr")
    made = {(m.group(1), m.group(2)) for m in map(pattern.fullmatch, files) if m}
    assert made == {(str(s.person.pid), kind) for s in log.sent
                    for kind in ("audio-0", "video-1")}, files

    out = tmp_path / "meeting.mp4"
    subprocess.run([sys.executable, "-m", "melter.cli", "render", str(rec_dir), "--room",
                    str(log.room), "--layout", "grid", "-o", str(out)],
                   check=True, cwd=tmp_path, env=melter_env({}), timeout=180)
    measured = measure(out, rec_dir, log)
    print(f"events {len(receiver.events)} in {receiver.posts} POSTs:", counts)
    print("recordings:", ", ".join(f"{p.name} ({p.stat().st_size} B)"
                                  for p in sorted(rec_dir.glob("*.mjr"))))
    print(summary(measured, log))
    check_rendering(measured, log)


def test_meeting_video_appears_on_storage(
    link: Link, janus_for: Callable[..., Janus], tmp_path: Path
) -> None:
    """Janus's events go to ``melter serve``: the video appears with nobody asking for it."""
    if not serve_available():
        pytest.skip("this tree's melter has no `serve` command")
    if not redis_available(REDIS_URL):
        pytest.skip(f"no Redis at {REDIS_URL}")
    with melter_service(tmp_path / "farm", link.host_ip, REDIS_URL, EVENTS_USER,
                        EVENTS_PASSWORD) as service:
        # The handler's "compress = true" (gzip bodies): serve reads these too.
        janus = janus_for(service.events_url, compress=True)
        log = meet(janus, service.recordings)
        destroyed = time.monotonic()
        check_local(log, link)
        try:
            wait_for(lambda: bool(service.rendered()), STORAGE_TIMEOUT,
                     "the meeting's video on storage")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- serve:\n{service.log('serve')}\n--- worker:\n"
                                 f"{service.log('worker')}") from None
        latency = time.monotonic() - destroyed
        videos = service.rendered()
    print(f"video on storage {latency:.1f} s after the room's destroy: {videos}")
    assert len(videos) == 1, videos
    assert str(log.room) in videos[0].name, videos
    # The farm commits a manifest beside each output.
    assert videos[0].with_name(videos[0].name + ".manifest.json").exists()
    measured = measure(videos[0], service.recordings, log)
    print(summary(measured, log))
    check_rendering(measured, log)


#: A 3 min 5 s meeting: X throughout, Y for a minute and a bit, Z for the middle 90 s.
LONG_PEOPLE = (
    Person("X", 101, (20, 160, 160), 350.0, 0.0),
    Person("Y", 102, (180, 40, 160), 500.0, 20.0, unpublish_at=95.0, leave_at=96.0),
    Person("Z", 103, (220, 200, 40), 750.0, 50.0, leave_at=140.0),
)
LONG_DESTROY_AT = 185.0
#: What users wait for: the video on storage this soon after the room's destroy.
READY_WITHIN_S = 15.0
#: A 640x360 grid: what two shared cores render in time (the 720p figures are in
#: bench/README.md, "Time to video").
LONG_LAYOUT = """name: grid-360p
canvas: {width: 640, height: 360, fps: 30, background: "#000000"}
regions:
  - {name: grid, max_rows: 4, max_columns: 4, fit: crop, padding: 4}
"""


def test_a_long_meeting_is_on_storage_within_15_s_of_its_destroy(
    link: Link, janus_for: Callable[..., Janus], tmp_path: Path
) -> None:
    if not serve_available():
        pytest.skip("this tree's melter has no `serve` command")
    if not redis_available(REDIS_URL):
        pytest.skip(f"no Redis at {REDIS_URL}")
    layout = tmp_path / "farm" / "storage" / "layouts" / "grid-360p.yaml"  # under the root
    layout.parent.mkdir(parents=True)
    layout.write_text(LONG_LAYOUT)
    settings = {"MELTER_DEFAULT_LAYOUT": str(layout), "MELTER_PRERENDER_SECONDS": "10",
                "MELTER_SETTLE_SECONDS": "1"}
    with melter_service(tmp_path / "farm", link.host_ip, REDIS_URL, EVENTS_USER,
                        EVENTS_PASSWORD, workers=2, settings=settings) as service:
        janus = janus_for(service.events_url, compress=True)
        log = meet(janus, service.recordings, people=LONG_PEOPLE, destroy_at=LONG_DESTROY_AT)
        check_local(log, link)
        try:
            wait_for(lambda: bool(service.rendered()), STORAGE_TIMEOUT,
                     "the meeting's video on storage")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- serve:\n{service.log('serve')}\n--- worker:\n"
                                 f"{service.log('worker')}") from None
        appeared = time.time()
        videos = service.rendered()
    latency = appeared - log.destroyed
    assert len(videos) == 1, videos
    manifest = json.loads(videos[0].with_name(videos[0].name + ".manifest.json").read_text())
    chunks = manifest["timings"]["chunks"]
    kept = [c["kept"] for c in chunks]
    print(f"{log.length:.1f} s meeting on storage {latency:.1f} s after the room's destroy; "
          f"{sum(kept)} of {len(chunks)} chunks rendered during the meeting: {videos[0]}")
    assert log.length >= 180
    assert latency <= READY_WITHIN_S, latency
    assert sum(kept) >= len(chunks) - 3, kept
    measured = measure(videos[0], service.recordings, log, layout=str(layout))
    print(summary(measured, log))
    check_rendering(measured, log)
