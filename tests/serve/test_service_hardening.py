"""``melter serve`` against what a hostile or broken client posts to ``/janus/events``, as a real
process on real Redis: credentials whenever it listens beyond loopback, bounded bodies (as
sent and inflated), nesting and events per POST, events checked one by one, a per-client rate
limit, room state that expires, and one bad room that no longer stops the others' renders.

Each test prints what it measured (HTTP status, response time, the service's peak RSS from
``/proc/PID/status`` VmHWM, Redis memory of the test's keys) and asserts bounds on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import redis

from melter.serve.rooms import MeetingSpan, Room
from tests.farm.test_farm import meeting_span
from tests.helpers.farm import FRAME, FarmHarness
from tests.helpers.service import (
    CLI,
    TOKEN,
    Service,
    copy_recordings,
    event_lines,
    farm,
    post_events,
    running_service,
    service_harness,
)

__all__ = ["farm"]  # the fixture, used by name

RSS_LIMIT_MB = 200
FIXTURE = "dev-two-party-h264"


def now_us() -> int:
    return int(time.time() * 1e6)


def videoroom(room: Any, kind: str = "joined", ts: int | None = None,
              publisher: Any = 7001) -> dict[str, Any]:
    """One VideoRoom event as Janus's sample event handler sends it."""
    return {"emitter": "test", "type": 64, "timestamp": now_us() if ts is None else ts,
            "session_id": 1, "handle_id": 2, "opaque_id": "x",
            "event": {"plugin": "janus.plugin.videoroom",
                      "data": {"event": kind, "room": room, "id": publisher}}}


def post(service: Service, body: bytes | Any, **kwargs: Any) -> tuple[httpx.Response, float]:
    """POST to /janus/events; the reply and its time in seconds."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    began = time.monotonic()
    reply = httpx.post(f"{service.url}/janus/events", content=content, timeout=60, **kwargs)
    return reply, time.monotonic() - began


def redis_bytes(harness: FarmHarness) -> tuple[int, int]:
    """Memory Redis reports for the test's keys (MEMORY USAGE), and how many keys."""
    r = redis.Redis.from_url(harness.env["MELTER_BROKER_URL"])
    total = count = 0
    for key in r.scan_iter(match=f"{harness.prefix}:*", count=1000):
        total += r.memory_usage(key, samples=0) or 0
        count += 1
    return total, count


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} in /metrics")


def bomb(size: int, wbits: int) -> bytes:
    """``size`` bytes of JSON whitespace, deflated (zlib header for wbits 15, gzip for 31)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    chunk = b" " * (1 << 20)
    parts = [packer.compress(b"[")]
    parts += [packer.compress(chunk) for _ in range(size // len(chunk))]
    parts.append(packer.compress(b"]") + packer.flush())
    return b"".join(parts)


# -- credentials -------------------------------------------------------------------------------
def test_serve_beyond_loopback_needs_janus_credentials(tmp_path: Path) -> None:
    harness = service_harness(tmp_path)
    try:
        began = time.monotonic()
        refused = subprocess.run(
            [sys.executable, "-c", CLI, "serve", "--host", "0.0.0.0", "--port", "0"],
            env=harness.env, capture_output=True, text=True, timeout=60)
        took = time.monotonic() - began
        print(f"0.0.0.0 without credentials: exit {refused.returncode} in {took:.2f} s: "
              f"{refused.stderr.strip()}")
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
        assert "MELTER_JANUS_USER" in refused.stderr and "backend_pwd" in refused.stderr
        harness.env.update(MELTER_JANUS_USER="janus", MELTER_JANUS_PASSWORD="pw-7781",
                           MELTER_JANUS_TOKEN="tok-3390")
        service = Service(harness, host="0.0.0.0")
        service.start()
        try:
            line = json.dumps(videoroom(1234))
            answers = {
                "none": post(service, line.encode())[0],
                "basic wrong": post(service, line.encode(), auth=("janus", "nope"))[0],
                "bearer wrong": post(service, line.encode(),
                                     headers={"Authorization": "Bearer nope"})[0],
                "api token": post(service, line.encode(),
                                  headers={"Authorization": f"Bearer {TOKEN}"})[0],
                "basic": post(service, line.encode(), auth=("janus", "pw-7781"))[0],
                "bearer": post(service, line.encode(),
                               headers={"Authorization": "Bearer tok-3390"})[0],
            }
        finally:
            service.stop()
        print("0.0.0.0 with credentials: " + ", ".join(
            f"{who} {reply.status_code}" for who, reply in answers.items()))
        assert {who: r.status_code for who, r in answers.items()} == {
            "none": 401, "basic wrong": 401, "bearer wrong": 401, "api token": 401,
            "basic": 200, "bearer": 200}
        assert answers["none"].headers["www-authenticate"] == 'Basic realm="melter"'
        assert "backend_user" in answers["none"].json()["error"]
    finally:
        harness.cleanup()


# -- bodies ------------------------------------------------------------------------------------
def test_oversized_compressed_deep_and_crowded_bodies_are_refused(farm: FarmHarness) -> None:
    zlib_bomb, gzip_bomb = bomb(900 << 20, 15), bomb(900 << 20, 31)
    deep = b"[" * 100_000 + b"]" * 100_000
    nested_40 = b"[" * 40 + b"]" * 40
    crowded = json.dumps([videoroom(4000 + k) for k in range(1001)]).encode()
    big = b"[" + b" " * 2_000_000 + b"]"
    with running_service(farm) as service:
        baseline = service.peak_rss_mb()
        before = redis_bytes(farm)
        cases = {
            "zlib bomb": (zlib_bomb, {}),
            "gzip bomb": (gzip_bomb, {}),
            "2 MB body": (big, {}),
            "2 MB body, chunked": (iter([big[:1 << 20], big[1 << 20:]]), {}),
            "100000 nested [": (deep, {}),
            "40 nested [": (nested_40, {}),
            "1001 events": (crowded, {}),
        }
        results: dict[str, tuple[int, float, str]] = {}
        for name, (body, extra) in cases.items():
            began = time.monotonic()
            if isinstance(body, bytes):
                reply, took = post(service, body, **extra)
            else:
                reply = httpx.post(f"{service.url}/janus/events", content=body, timeout=60)
                took = time.monotonic() - began
            results[name] = (reply.status_code, took, reply.json()["error"])
        # a good event still goes through afterwards, zlib-compressed as sampleevh does
        good, _ = post(service, zlib.compress(json.dumps([videoroom(4999)]).encode()))
        peak = service.peak_rss_mb()
        after = redis_bytes(farm)
    print(f"compressed sizes: zlib {len(zlib_bomb)} B, gzip {len(gzip_bomb)} B "
          f"(each inflates to 900 MiB)")
    for name, (status, took, error) in results.items():
        print(f"{name}: HTTP {status} in {took * 1000:.0f} ms: {error}")
    print(f"service peak RSS {baseline:.0f} MB at start, {peak:.0f} MB after; Redis memory of "
          f"the test's keys {before[0]} B -> {after[0]} B ({before[1]} -> {after[1]} keys)")
    assert len(zlib_bomb) < 1_000_000 and len(gzip_bomb) < 1_000_000
    expected = {"zlib bomb": 413, "gzip bomb": 413, "2 MB body": 413,
                "2 MB body, chunked": 413, "100000 nested [": 400, "40 nested [": 400,
                "1001 events": 413}
    assert {k: v[0] for k, v in results.items()} == expected
    for name in ("zlib bomb", "gzip bomb"):
        assert results[name][1] < 1.0, results[name]
        assert "MELTER_JANUS_MAX_INFLATED_BYTES" in results[name][2]
    assert all(took < 2.0 for _, took, _ in results.values()), results
    assert "nested deeper than 32" in results["40 nested ["][2]
    assert peak < RSS_LIMIT_MB, peak
    assert good.status_code == 200 and good.json()["videoroom"] == 1


# -- events, one by one -------------------------------------------------------------------------
def test_each_event_is_checked_and_room_state_is_bounded(tmp_path: Path) -> None:
    harness = service_harness(tmp_path, MELTER_ROOM_TTL_SECONDS="3600")
    try:
        with running_service(harness) as service:
            now = now_us()
            day = 86_400_000_000
            bad = [videoroom({"a": 1}), videoroom([1]), videoroom(True), videoroom(2**64),
                   videoroom(-1), videoroom("x" * 10_000), videoroom("../../etc"),
                   videoroom(1.5), videoroom(5001, ts=10**30), videoroom(5001, ts=now + 2 * day),
                   videoroom(5001, ts=now - 2 * day), videoroom(5001, ts=True),
                   videoroom(5001, publisher={"id": 1}), videoroom(5001, publisher="p" * 200)]
            good = [videoroom(2**64 - 1), videoroom("board-7.east"), videoroom(5001),
                    videoroom(5001, ts=now - day // 2)]
            reply, took = post(service, bad + good)
            answer = reply.json()
            # 2000 distinct 10 kB room names in one POST: 20 MB, refused whole
            huge = [videoroom(f"r{k:05d}" + "x" * 10_000) for k in range(2000)]
            refused, refused_took = post(service, huge)
            empty = redis_bytes(harness)
            # 2000 distinct rooms of the longest name allowed, in two POSTs
            posts = []
            for half in range(2):
                names = [f"{half}{k:04d}".ljust(128, "n") for k in range(1000)]
                posts.append(post(service, [videoroom(n) for n in names]))
            full = redis_bytes(harness)
            r = redis.Redis.from_url(harness.env["MELTER_BROKER_URL"], decode_responses=True)
            ttls = [r.ttl(k) for k in r.scan_iter(match=f"{harness.prefix}:svc:room:*",
                                                  count=1000)]
            with service.client() as client:
                metrics = client.get("/metrics").text
                rooms = client.get("/rooms").json()
    finally:
        harness.cleanup()
    print(f"14 bad and 4 good events: HTTP {reply.status_code} in {took * 1000:.0f} ms, "
          f"{answer}")
    print(f"2000 rooms of 10 kB in one POST ({sum(len(json.dumps(e)) for e in huge)} B): "
          f"HTTP {refused.status_code} in {refused_took * 1000:.0f} ms; Redis then "
          f"{empty[0]} B in {empty[1]} keys")
    print(f"2000 rooms of 128 characters in two POSTs: HTTP "
          f"{[p[0].status_code for p in posts]} in {[round(p[1] * 1000) for p in posts]} ms; "
          f"Redis {full[0]} B in {full[1]} keys ({full[0] / 2000:.0f} B per room); room TTLs "
          f"{min(ttls)}..{max(ttls)} s over {len(ttls)} keys")
    assert reply.status_code == 200
    assert answer["videoroom"] == 4
    assert answer["dropped"] == {"room": 8, "timestamp": 4, "publisher": 2}
    assert metric(metrics, 'melter_janus_events_dropped_total{reason="timestamp"}') == 4
    assert metric(metrics, 'melter_janus_events_dropped_total{reason="room"}') == 8
    assert rooms["dropped_events"] == {"room": 8, "timestamp": 4, "publisher": 2}
    assert {str(2**64 - 1), "board-7.east", "5001"} <= set(rooms["rooms"])
    assert refused.status_code == 413 and refused_took < 1.0
    assert empty[0] < 20_000, empty
    assert [p[0].status_code for p in posts] == [200, 200]
    # 2 kB a room at most: its state, and its name in the sets that order rooms (seen, idle,
    # by client, live)
    assert full[0] < 4_000_000, full
    assert len(ttls) == 2003 and all(0 < t <= 3600 for t in ttls), (min(ttls), max(ttls))


def test_rooms_that_expired_are_forgotten(farm: FarmHarness) -> None:
    """The tracker's indexes follow the rooms' TTL: nothing stays behind a room that
    expired."""
    from melter.farm.jobs import Farm
    from melter.serve.config import load_settings
    from melter.serve.tracker import Tracker

    tracker = Tracker(load_settings(farm.env), Farm(farm.config))
    events = [e for line in event_lines(FIXTURE) for e in _parse(line)]
    without_end = [e for e in events if e.kind != "destroyed"]
    tracker.handle(without_end)
    assert tracker.rooms() == ["2002"]
    key = tracker.room_key("2002")
    ttl = tracker.r.ttl(key)
    tracker.r.delete(key)  # as Redis does when the TTL passes
    forgotten = tracker.expire_rooms(now=time.time() + tracker.ttl + 1)
    leftovers = {name: tracker.r.exists(f"{tracker.p}:{name}") for name in ("seen", "due")}
    print(f"room TTL {ttl} s of {tracker.ttl}; forgotten {forgotten}; indexes left {leftovers}")
    assert 0 < ttl <= tracker.ttl == 172800
    assert forgotten == 1 and tracker.rooms() == []
    assert tracker.r.zscore(f"{tracker.p}:due", "2002") is None


def test_rooms_are_bounded_and_idle_ones_are_forgotten_first(farm: FarmHarness) -> None:
    """Any number of distinct rooms leaves at most MELTER_MAX_ROOMS followed: rooms that were
    only created (or had nothing to render) expire soon and give their place to new ones; a
    room with people publishing is never forgotten for another, and when every followed room
    holds one, a new room's events are dropped and counted."""
    from melter.farm.jobs import Farm
    from melter.serve.config import load_settings
    from melter.serve.tracker import Tracker

    env = {**farm.env, "MELTER_MAX_ROOMS": "50", "MELTER_IDLE_ROOM_TTL_SECONDS": "60"}
    tracker = Tracker(load_settings(env), Farm(farm.config))
    for first in range(0, 500, 50):  # as Janus posts them: a POST at a time
        tracker.handle([e for k in range(first, first + 50) for e in _parse(json.dumps(
            videoroom(f"flood-{k}", "created", publisher=None)))])
    flood_ttl = tracker.r.ttl(tracker.room_key("flood-499"))
    followed_after_flood = len(tracker.rooms())
    real = [e for line in event_lines(FIXTURE) for e in _parse(line) if e.kind != "destroyed"]
    tracker.handle(real)
    real_ttl = tracker.r.ttl(tracker.room_key("2002"))
    busy = [e for k in range(60) for e in _parse(json.dumps(videoroom(f"busy-{k}")))]
    tracker.handle(busy)
    stats = tracker.stats()
    rooms = tracker.rooms()
    keys = list(tracker.r.scan_iter(match=f"{tracker.p}:room:*", count=1000))
    late = tracker.handle(_parse(json.dumps(videoroom("late-comer"))))
    print(f"500 created rooms: {followed_after_flood} followed, TTL {flood_ttl} s; the real "
          f"room's TTL {real_ttl} s; then 60 rooms with a publisher: {len(rooms)} followed, "
          f"{len(keys)} room keys, stats {stats}")
    assert followed_after_flood == 50 and 0 < flood_ttl <= 60
    assert stats["idle_rooms_forgotten"] == 450 + 50
    assert "2002" in rooms and real_ttl > 3600
    assert len(rooms) == 50 and len(keys) == 50
    assert sum(room.startswith("busy-") for room in rooms) == 49
    assert not any(room.startswith("flood-") for room in rooms)
    assert stats["dropped_room_limit"] == 11
    assert late == [] and "late-comer" not in tracker.rooms()
    assert tracker.stats()["dropped_room_limit"] == 12


def test_a_client_flooding_room_names_crowds_out_only_itself(farm: FarmHarness) -> None:
    """A client with Janus's credentials that names thousands of rooms, each with someone in
    it, fills the places; Janus's own new rooms then take the flooder's oldest places, never the
    other way round, and the fixture meeting posted by Janus is still followed to its end."""
    from melter.farm.jobs import Farm
    from melter.serve.config import load_settings
    from melter.serve.tracker import Tracker

    env = {**farm.env, "MELTER_MAX_ROOMS": "100"}
    tracker = Tracker(load_settings(env), Farm(farm.config))
    flooder, janus = "10.9.9.9", "10.0.0.1"
    for first in range(0, 300, 50):
        tracker.handle([e for k in range(first, first + 50) for e in _parse(json.dumps(
            videoroom(f"flood-{k}")))], client=flooder)
    full = len(tracker.rooms())
    events = [e for line in event_lines(FIXTURE) for e in _parse(line)]
    ended = tracker.handle(events, client=janus)
    others = [e for k in range(20) for e in _parse(json.dumps(videoroom(f"janus-{k}")))]
    tracker.handle(others, client=janus)
    more_flood = tracker.handle(_parse(json.dumps(videoroom("flood-late"))), client=flooder)
    rooms = tracker.rooms()
    stats = tracker.stats()
    owners = tracker.holdings()
    print(f"flooder: {full} rooms followed of 100; then Janus's meeting and 20 rooms: "
          f"{len(rooms)} followed, owners {owners}, stats {stats}")
    assert full == 100
    assert ended and "2002" in rooms
    assert all(f"janus-{k}" in rooms for k in range(20))
    assert len(rooms) == 100 and stats["rooms_crowded_out"] == 21
    assert owners == {flooder: 79, janus: 21}
    assert more_flood == [] and "flood-late" not in rooms
    assert "flood-0" not in rooms and "flood-99" in rooms and "flood-299" not in rooms


def _parse(line: str) -> list[Any]:
    from melter.serve.rooms import parse_events

    return parse_events(json.loads(line), now=time.time())


# -- one bad room ------------------------------------------------------------------------------
def test_a_bad_room_does_not_stop_another_rooms_render(farm: FarmHarness) -> None:
    """Before: an event with timestamp 10**30 raised OverflowError in the rooms thread on every
    tick, and no room was rendered again. Now the event is dropped; a room whose stored state
    fails anyway (written by an older version) is marked and the others go on: the fixture
    meeting is rendered."""
    copy_recordings(farm, [FIXTURE])
    folder = farm.storage / "recordings"
    for path in (Path(__file__).parent.parent / "fixtures" / FIXTURE).glob("*.mjr"):
        (folder / path.name.replace("videoroom-2002-", "videoroom-1000-")).write_bytes(
            path.read_bytes())
    r = redis.Redis.from_url(farm.env["MELTER_BROKER_URL"], decode_responses=True)
    p = f"{farm.prefix}:svc"
    # what an older service stored from {"timestamp": 10**30} events: rooms that sort first
    overflow = Room("1000", [MeetingSpan("1000-" + str(10**30), "1000", 10**30, 10**30,
                                     end=10**30, ended_by="destroyed",
                                     render={"state": "pending", "not_before": 0})])
    r.set(f"{p}:room:1000", overflow.to_json())
    r.set(f"{p}:room:1001", '{"room": "1001", "meetings": [{"bogus": 1}]}')
    r.sadd(f"{p}:pending", "1000", "1001")
    farm.start_worker("w1")
    with running_service(farm) as service:
        far = now_us() + 10 * 365 * 86_400_000_000
        reply, _ = post(service, [videoroom(2002, "destroyed", ts=far, publisher=None),
                                  videoroom(1002, "created", ts=10**30, publisher=None)])
        began = time.monotonic()
        post_events(service, event_lines(FIXTURE))
        with service.client() as client:
            job = _wait(lambda: client.get("/jobs", params={"room": "2002"}).json(), 20)[0]
            queued = time.monotonic() - began
            done = _wait(lambda: client.get(f"/jobs/{job['id']}").json()
                         if client.get(f"/jobs/{job['id']}").json()["state"] in (
                             "done", "failed") else None, 180)
            rooms = client.get("/rooms").json()
            one = client.get("/rooms/1000").json()
            metrics = client.get("/metrics").text
        log = service.text()
    output = Path(done["outputs"][0])
    length = _duration(output)
    span = meeting_span(FIXTURE)
    print(f"far-future destroyed and 10**30 created: HTTP {reply.status_code} "
          f"{reply.json()['dropped']}; room 2002's job {job['id']} queued {queued:.1f} s after "
          f"its events, {done['state']}, {output.name} {length:.3f} s (meeting span "
          f"{span:.3f} s); failed rooms {sorted(rooms['failed'])}: "
          f"{ {k: v['error'] for k, v in rooms['failed'].items()} }; "
          f"melter_rooms_failed {metric(metrics, 'melter_rooms_failed')}")
    assert reply.json()["dropped"] == {"timestamp": 2}
    assert done["state"] == "done" and done["metadata"]["ended_by"] == "destroyed"
    assert abs(length - span) <= 2 * FRAME, (length, span)
    assert set(rooms["failed"]) == {"1000", "1001"}
    assert "OverflowError" in rooms["failed"]["1000"]["error"]
    assert one["meetings"][0]["render"]["state"] == "failed"
    assert metric(metrics, "melter_rooms_failed") == 2
    assert metric(metrics, 'melter_auto_renders_total{outcome="submitted"}') == 1
    assert log.count("room 1000: render submission failed") == 1, log[-3000:]


def _wait(get: Any, timeout: float) -> Any:
    began = time.monotonic()
    while True:
        value = get()
        if value:
            return value
        if time.monotonic() - began > timeout:
            raise AssertionError("timed out")
        time.sleep(0.2)


def _duration(path: Path) -> float:
    import av

    with av.open(str(path)) as container:
        return float(container.duration or 0) / 1e6


# -- rate --------------------------------------------------------------------------------------
def test_a_client_over_its_rate_gets_429_and_others_do_not(tmp_path: Path) -> None:
    harness = service_harness(tmp_path, MELTER_JANUS_RATE_LIMIT="20",
                              MELTER_JANUS_RATE_BURST="40")
    try:
        with running_service(harness) as service:
            line = json.dumps(videoroom(6001)).encode()
            url = f"{service.url}/janus/events"
            began = time.monotonic()
            with httpx.Client(timeout=10) as client:
                statuses = [client.post(url, content=line) for _ in range(200)]
            flood = time.monotonic() - began
            other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"),
                                 timeout=10)
            with other:
                others = [other.post(url, content=line).status_code for _ in range(10)]
            wait = int(next(s for s in statuses if s.status_code == 429)
                       .headers["retry-after"])
            time.sleep(1.0)
            later = [httpx.post(url, content=line).status_code for _ in range(10)]
            with service.client() as api:
                metrics = api.get("/metrics").text
    finally:
        harness.cleanup()
    accepted = sum(s.status_code == 200 for s in statuses)
    limited = sum(s.status_code == 429 for s in statuses)
    print(f"200 POSTs in {flood:.2f} s from 127.0.0.1 at 20/s, burst 40: {accepted} accepted, "
          f"{limited} refused 429 (Retry-After {wait} s); from 127.0.0.2 meanwhile "
          f"{others}; a second later {later}; melter_janus_rate_limited_total "
          f"{metric(metrics, 'melter_janus_rate_limited_total')}")
    assert accepted + limited == 200
    assert 40 <= accepted <= 40 + 20 * flood + 1, (accepted, flood)
    assert others == [200] * 10
    assert later.count(200) >= 10 - 1 and later.count(200) <= 10
    assert wait >= 1
    assert metric(metrics, "melter_janus_rate_limited_total") == limited + later.count(429)
