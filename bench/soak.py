"""Soak of ``melter serve``: minutes of hostile and valid Janus event posts at the highest rate
the machine takes, with a real meeting among them every minute, against a real service, real
farm workers and a real Redis.

    python -m bench.soak                          # 10 minutes, as fast as the machine goes
    python -m bench.soak --minutes 1 --rate 300   # one minute, at most 300 POSTs a second

It starts ``melter serve`` (Janus credentials set, its own Redis database and key prefix, a
storage root in a temporary folder) and ``--workers`` farm workers, then runs until the time is
up:

* hostile clients (``--hostile``, each from its own loopback address, as the service limits
  rates per address), each POST one of: a body over the size cap (declared, or chunked), a zlib
  and a gzip bomb (900 MiB of JSON whitespace in under 1 MB), 50 000 nested arrays, events with
  far-future or garbage timestamps, object and other impossible room ids, 100 distinct room
  names, bad credentials, malformed JSON, 1 001 events;
* valid clients (``--valid``): rooms with no recordings, each created, joined and published by
  two people, then destroyed (three in four) or left to the grace period, posted as Janus's
  sample event handler does (arrays of events, zlib-compressed or not, with non-VideoRoom
  events among them); their renders are skipped (no recordings);
* every ``--meeting-every`` seconds a real meeting: a fixture meeting of ``tests/fixtures``
  copied into the recordings folder under a new room number, its Janus events moved to now and
  posted at the pace Janus sent them (``--meeting-pace burst``: at once); it is rendered on the
  farm.

The service follows at most ``--max-rooms`` rooms (``MELTER_MAX_ROOMS``, 20 000); a room with
nothing to keep (such as a fake room once its render is skipped) expires after
``--idle-room-ttl`` seconds (``MELTER_IDLE_ROOM_TTL_SECONDS``, 600) and is the first forgotten
when a new room needs its place; when no room is idle, a new room takes the oldest place of
the client address that named the most rooms, while that address holds more than the asking
one (``rooms_crowded_out``); otherwise its events are dropped and counted
(``dropped_room_limit``). Both settings are set explicitly and printed at the start.

Every minute it prints one line: elapsed time, POSTs sent by class and answers by status in
that minute, POSTs a second, the 50th and 99th percentile answer times, the service's CPU
share and RSS (psutil, with its children; the workers' RSS beside), Redis's ``used_memory``
(the whole server), the keys under the run's prefix with their memory (``MEMORY USAGE``; room
keys estimated from a sample), the tracker's counts of idle rooms forgotten, rooms crowded out
and events dropped at the room limit so far, and the rooms followed per client address (the
last byte of the address, by kind of client). At the end it checks that each real meeting was
rendered exactly once (one job for its room, done, the output's duration within 0.1 s of the
meeting's span, measured with PyAV), that no other job exists, no answer was 5xx, none was
unexpected for its kind (429 is always allowed), no request went unanswered, no room failed or
was left undecided, every fake room whose last POST was taken was followed to its end (the
service logged its render skipped for want of recordings, once), the last 20 of each valid
client are followed and skipped for want of recordings, ended as posted (destroyed or empty),
or else were forgotten as idle after that skip, which must then have been logged before the
last POST was answered (after it, no new room asks for a place), the keys under the prefix
stayed at most ``--max-rooms`` + 1 000 in every minute, and, in runs of three minutes or more,
that memory is flat after the warm-up: the largest Redis ``used_memory`` (the whole server)
and the largest service RSS of minutes 2 to the last exceed those of minute 2 by at most 10 %
or 16 MB, whichever is more. The summary prints the tracker's counters and the rooms per
client address at the end. Exit status 0 when every check passed, 1 otherwise. Everything it
made (processes, Redis keys, the folder) is removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import io
import json
import os
import random
import re
import secrets
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import psutil
import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
#: The meetings rendered in turn (shortest first, for short runs).
MEETINGS = ["dev-two-party-h264", "dev-three-party-vp8", "janus-30fps-h264",
            "janus-mixed-fps-vp8", "janus-10fps-vp8", "dev-turn-taking-vp8"]
CLI = "from melter.cli import main; main()"
SMALL_LAYOUT: dict[str, Any] = {
    "name": "small",
    "canvas": {"width": 320, "height": 180, "fps": 30},
    "labels": {"enabled": False},
    "regions": [{"name": "grid", "max_rows": 4, "max_columns": 4, "fit": "crop"}],
}
DURATION_TOLERANCE = 0.1  # s, between a render and its meeting's span
MB = 1024 * 1024
#: Keys under the prefix beyond MELTER_MAX_ROOMS: the tracker's indexes (one per client
#: address among them) and counters and the farm's job, queue and lock keys (under 100 with ten
#: jobs), and the rooms admitted by POSTs in flight together, as admission and the room's
#: write are separate round trips (eight clients, at most 100 new rooms a POST).
KEY_SLACK = 1000
#: Growth allowed after the warm-up, of Redis used_memory and of the service's RSS: 10 % or
#: 16 MB, whichever is more. The room state at the cap (20 000 rooms of about 650 B with their
#: index entries, 12.5 MB) fits within it even if the cap is reached only after minute 2, while
#: state kept per room posted (17 MB a minute at this load) does not.
FLAT_SHARE = 0.10
FLAT_BYTES = 16 * MB
#: The last byte of each client's loopback address: the real meetings', the first hostile
#: client's and the first Janus-like client's (the others follow).
REAL_ADDRESS, HOSTILE_ADDRESS, VALID_ADDRESS = 2, 10, 40
#: The service's log line of a meeting whose render is skipped for want of recordings: its
#: time (local) and room.
SKIPPED_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) WARNING melter\.serve: "
                          r"meeting (\S+)-\d+: not rendered: no recordings of room ")


def now_us() -> int:
    return time.time_ns() // 1000


# -- HTTP ---------------------------------------------------------------------------------------
class ClientError(Exception):
    """The request got no answer: connection refused, reset, closed or timed out."""


class Http:
    """One keep-alive HTTP/1.1 connection from a given loopback address (the service keeps a
    rate bucket per client address). Written on asyncio streams: the load generator must cost
    far less CPU than the service it measures. A connection idle for ``idle`` seconds is not
    reused: uvicorn closes it after 5 s, and a request sent as it closes gets no answer."""

    def __init__(self, port: int, local: str, timeout: float = 30.0, idle: float = 3.0) -> None:
        self.port = port
        self.local = local
        self.timeout = timeout
        self.idle = idle
        self.used = 0.0
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None,
                      chunked: bool = False) -> tuple[int, bytes]:
        try:
            return await asyncio.wait_for(self._request(method, path, body, headers or {},
                                                        chunked), self.timeout)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                TimeoutError, ValueError) as exc:
            await self.close()
            raise ClientError(f"{type(exc).__name__}: {exc}") from None

    async def _request(self, method: str, path: str, body: bytes, headers: dict[str, str],
                       chunked: bool) -> tuple[int, bytes]:
        if self.writer is not None and self.reader is not None and (
                self.reader.at_eof() or time.monotonic() - self.used > self.idle):
            await self.close()
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                "127.0.0.1", self.port, local_addr=(self.local, 0))
        assert self.reader is not None
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if chunked:
            lines.append("Transfer-Encoding: chunked")
            step = 1 << 16
            payload = b"".join(b"%x\r\n%b\r\n" % (len(body[k:k + step]), body[k:k + step])
                               for k in range(0, len(body), step)) + b"0\r\n\r\n"
        else:
            lines.append(f"Content-Length: {len(body)}")
            payload = body
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        fields = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        content = await self.reader.readexactly(int(fields.get("content-length", "0")))
        self.used = time.monotonic()
        if fields.get("connection", "").lower() == "close":
            await self.close()
        return status, content


class Pacer:
    """At most ``rate`` requests a second over all the clients that share it (0: no cap)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.next = time.monotonic()

    async def wait(self) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self.next = max(self.next + 1 / self.rate, now)
        if self.next > now:
            await asyncio.sleep(self.next - now)


# -- what is posted -----------------------------------------------------------------------------
def videoroom(room: Any, kind: str, ts: Any = None, publisher: Any = None,
              **data: Any) -> dict[str, Any]:
    """One VideoRoom event as Janus's sample event handler sends it."""
    fields: dict[str, Any] = {"event": kind, "room": room, **data}
    if publisher is not None:
        fields["id"] = publisher
    return {"emitter": "soak", "type": 64, "timestamp": now_us() if ts is None else ts,
            "session_id": random.getrandbits(52), "handle_id": random.getrandbits(52),
            "event": {"plugin": "janus.plugin.videoroom", "data": fields}}


def core_event(ts: int) -> dict[str, Any]:
    """A non-VideoRoom event (session, transport) of the kind sampleevh sends beside them."""
    if random.random() < 0.5:
        return {"emitter": "soak", "type": 1, "timestamp": ts,
                "session_id": random.getrandbits(52),
                "event": {"name": "created", "transport": {"id": "1", "transport":
                                                           "janus.transport.http"}}}
    return {"emitter": "soak", "type": 128, "timestamp": ts,
            "event": {"transport": "janus.transport.http", "id": str(random.getrandbits(60)),
                      "data": {"event": "request", "admin_api": False, "ip": "127.0.0.1",
                               "port": random.randint(1024, 65535)}}}


def bomb(size: int, wbits: int) -> bytes:
    """``[``, ``size`` bytes of JSON whitespace and ``]``, deflated (zlib header and Adler-32
    for wbits 15, gzip for 31). After a full flush a deflate block refers to nothing before it,
    so the block of one MiB of spaces is repeated instead of compressing every MiB again."""
    chunk = b" " * MB
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    head = packer.compress(b"[") + packer.flush(zlib.Z_FULL_FLUSH)
    block = packer.compress(chunk) + packer.flush(zlib.Z_FULL_FLUSH)
    closer = zlib.compressobj(9, zlib.DEFLATED, -15)
    end = closer.compress(b"]") + closer.flush()
    count = size // MB
    check = zlib.crc32 if wbits == 31 else zlib.adler32
    value = check(b"[")
    for _ in range(count):
        value = check(chunk, value)
    value = check(b"]", value)
    trailer = (struct.pack("<II", value, (count * MB + 2) & 0xFFFFFFFF) if wbits == 31
               else struct.pack(">I", value))
    return head + block * count + end + trailer


@dataclass
class Post:
    kind: str
    body: bytes
    expect: frozenset[int]
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False


class Hostile:
    """The hostile POSTs, built once where they do not change."""

    KINDS = ("oversized", "oversized-chunked", "zlib-bomb", "gzip-bomb", "deep-nesting",
             "bad-timestamps", "object-room-ids", "distinct-rooms", "bad-credentials",
             "malformed-json", "too-many-events")

    def __init__(self, auth: str, api_token: str) -> None:
        self.auth = auth
        self.api_token = api_token
        self.big = b"[" + b" " * 1_500_000 + b"]"
        self.zlib_bomb = bomb(900 * MB, 15)
        self.gzip_bomb = bomb(900 * MB, 31)
        self.deep = b"[" * 50_000 + b"]" * 50_000
        self.crowded = json.dumps([videoroom(4000 + k, "joined", publisher=k)
                                   for k in range(1001)]).encode()
        self.flooded = 0

    def make(self, kind: str, rng: random.Random, client: int) -> Post:
        json_type = {"Content-Type": "application/json", "Authorization": self.auth}
        now = now_us()
        day = 86_400_000_000
        if kind == "oversized":
            return Post(kind, self.big, frozenset({413}), json_type)
        if kind == "oversized-chunked":
            return Post(kind, self.big, frozenset({413}), json_type, chunked=True)
        if kind == "zlib-bomb":
            return Post(kind, self.zlib_bomb, frozenset({413}), json_type)
        if kind == "gzip-bomb":
            return Post(kind, self.gzip_bomb, frozenset({413}), json_type)
        if kind == "deep-nesting":
            return Post(kind, self.deep, frozenset({400}), json_type)
        if kind == "bad-timestamps":
            stamps: list[Any] = [10**30, now + 2 * day, now - 2 * day, -5, 0, "soon", True,
                                 1.5e300, None, 2**63]
            events = [videoroom(5000 + client, rng.choice(["created", "destroyed", "joined"]),
                                ts=ts, publisher=7) for ts in rng.sample(stamps, 5)]
            return Post(kind, json.dumps(events).encode(), frozenset({200}), json_type)
        if kind == "object-room-ids":
            rooms: list[Any] = [{"a": 1}, [1], True, 2**64, -1, 1.5, None, "../../etc",
                                "x" * 5000, ".hidden", "a/b", "", "room with spaces"]
            events = [videoroom(room, rng.choice(["created", "destroyed", "joined"]),
                                publisher=7) for room in rng.sample(rooms, 6)]
            events.append(videoroom(5100 + client, "joined", publisher={"id": 1}))
            return Post(kind, json.dumps(events).encode(), frozenset({200}), json_type)
        if kind == "distinct-rooms":
            base = self.flooded
            self.flooded += 100
            events = [videoroom(f"flood-{client}-{base + k:08d}", "joined", publisher=k)
                      for k in range(100)]
            return Post(kind, json.dumps(events).encode(), frozenset({200}), json_type)
        if kind == "bad-credentials":
            wrong = rng.choice([
                {}, {"Authorization": "Basic " + base64.b64encode(b"janus:nope").decode()},
                {"Authorization": f"Bearer {self.api_token}"},
                {"Authorization": "Basic %%%not-base64"}, {"Authorization": "Bearer "},
            ])
            body = json.dumps(videoroom(5200 + client, "destroyed")).encode()
            return Post(kind, body, frozenset({401}),
                        {"Content-Type": "application/json", **wrong})
        if kind == "malformed-json":
            body = rng.choice([b'{"type": 64, "event": ', b"\x00\xff\xfe garbage", b"[1, 2,",
                               b"\x78\x9c not zlib at all", zlib.compress(b"[1, 2, 3]")[:-6],
                               b"\x1f\x8b\x08\x00 cut", b'{"type": 64}}', b"nul\x00l"])
            return Post(kind, body, frozenset({400}), json_type)
        if kind == "too-many-events":
            return Post(kind, self.crowded, frozenset({413}), json_type)
        raise ValueError(kind)


class FakeRooms:
    """Rooms that Janus could have hosted, without recordings: each POST is the next step of
    one of them, so every room is created, joined, published, left and (mostly) destroyed."""

    def __init__(self, auth: str, client: int, rng: random.Random) -> None:
        self.auth = auth
        self.client = client
        self.rng = rng
        self.steps: list[list[dict[str, Any]]] = []
        self.rooms = 0
        self.destroyed = 0
        self.room = 0
        self.ends_destroyed = False
        #: the last rooms whose every POST was taken: (room, destroyed or left to the grace)
        self.finished: list[tuple[str, bool]] = []
        #: every room whose last POST was taken, in order
        self.all_finished: list[str] = []

    def _room(self) -> list[list[dict[str, Any]]]:
        self.rooms += 1
        room = self.room = 9_000_000_000 + self.client * 100_000_000 + self.rooms
        a, b = self.rng.getrandbits(40), self.rng.getrandbits(40)
        t = now_us()

        def at(k: int) -> int:
            return t + k * 10_000

        steps = [
            [videoroom(room, "created", at(0)), core_event(at(0)),
             videoroom(room, "joined", at(1), a, display="A"),
             videoroom(room, "published", at(2), a)],
            [videoroom(room, "joined", at(3), b, display="B"), core_event(at(3)),
             videoroom(room, "published", at(4), b)],
            [videoroom(room, "unpublished", at(5), a), videoroom(room, "leaving", at(6), a),
             videoroom(room, "unpublished", at(7), b), videoroom(room, "leaving", at(8), b)],
        ]
        self.ends_destroyed = self.rng.random() < 0.75
        if self.ends_destroyed:
            steps[-1].append(videoroom(room, "destroyed", at(9)))
            self.destroyed += 1
        return steps

    def make(self) -> tuple[Post, bool]:
        """The next POST, and whether it is its room's last."""
        if not self.steps:
            self.steps = self._room()
        events = self.steps.pop(0)
        body = json.dumps(events if len(events) > 1 else events[0]).encode()
        if self.rng.random() < 0.5:  # sampleevh's compress = true
            body = zlib.compress(body)
        return Post("valid", body, frozenset({200}),
                    {"Content-Type": "application/json", "Authorization": self.auth}), \
            not self.steps

    def done(self) -> None:
        self.finished = [*self.finished[-199:], (str(self.room), self.ends_destroyed)]
        self.all_finished.append(str(self.room))


# -- the farm and the service -------------------------------------------------------------------
@dataclass
class RealMeeting:
    fixture: str
    room: str
    span: float  # s, first to last packet (+20 ms), from the fixture's manifest
    posts: int = 0
    retried: int = 0
    failed_posts: int = 0
    started: float = 0.0  # monotonic
    posted: float = 0.0  # monotonic, when its last POST was answered
    destroyed: float = 0.0  # Unix time, when the POST with the room's destroyed was answered
    job: dict[str, Any] | None = None
    duration: float | None = None
    jobs: int = 0

    def timings(self) -> str:
        """When the job was submitted and ended, from the destroyed POST; how long it ran."""
        if self.job is None:
            return "no job"
        timings = self.job.get("timings") or {}

        def after(key: str) -> str:
            stamp = timings.get(key)
            if not stamp or not self.destroyed:
                return "?"
            return f"{dt.datetime.fromisoformat(stamp).timestamp() - self.destroyed:.1f}"

        return (f"submitted {after('submitted')} s and {self.job['state']} "
                f"{after('finished')} s after the destroyed POST (rendered in "
                f"{timings.get('running_s')} s)")


def meeting_span(fixture: str) -> float:
    """First packet to the end of the last one on its sender's media clock (first packet's
    arrival plus RTP span, as ``tests/render/test_render.py``), plus the last audio packet's
    20 ms."""
    files = json.loads((FIXTURES / fixture / "manifest.json").read_text())["files"]
    start = min(f["mjr_first_packet_us"] for f in files)
    end = max(f["mjr_first_packet_us"] + f["rtp"]["rtp_span_s"] * 1e6 for f in files)
    return (end - start) / 1e6 + 0.020


def media_duration(path: Path) -> float:
    with av.open(str(path)) as container:
        return float(container.duration or 0) / 1e6


class Tally:
    """Counts of one minute (and of the whole run)."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.status: Counter[str] = Counter()
        self.by_kind: dict[str, Counter[str]] = {}
        self.unexpected: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency: list[float] = []
        self.kind_latency: dict[str, list[float]] = {}

    def add(self, group: str, kind: str, status: str, took: float, ok: bool) -> None:
        self.sent[group] += 1
        self.status[status] += 1
        self.by_kind.setdefault(kind, Counter())[status] += 1
        self.latency.append(took)
        self.kind_latency.setdefault(kind, []).append(took)
        if not ok:
            self.unexpected[f"{kind}:{status}"] += 1


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = Path(tempfile.mkdtemp(prefix="melter-soak-"))
        self.storage = self.base / "storage"
        self.recordings = self.storage / "recordings"
        self.renders = self.storage / "renders"
        self.recordings.mkdir(parents=True)
        (self.storage / "layouts").mkdir()
        layout = self.storage / "layouts" / "small.yaml"
        layout.write_text(yaml.safe_dump(SMALL_LAYOUT))
        self.prefix = f"msoak-{secrets.token_hex(4)}"
        self.token = secrets.token_urlsafe(16)
        self.password = secrets.token_urlsafe(16)
        self.auth = "Basic " + base64.b64encode(f"janus:{self.password}".encode()).decode()
        self.port = free_port()
        code = ROOT if args.snapshot == "none" else take_snapshot(args.snapshot,
                                                                  self.base / "code")
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]),
            "MELTER_BROKER_URL": args.redis,
            "MELTER_STORAGE_ROOT": str(self.storage),
            "MELTER_KEY_PREFIX": self.prefix,
            "MELTER_QUEUE_PREFIX": f"{self.prefix}-",
            "MELTER_BROKER_KEY_PREFIX": f"{self.prefix}:",
            "MELTER_CACHE_DIR": str(self.base / "cache"),
            "MELTER_RECORDINGS_DIR": str(self.recordings),
            "MELTER_API_TOKEN": self.token,
            "MELTER_JANUS_USER": "janus",
            "MELTER_JANUS_PASSWORD": self.password,
            "MELTER_GRACE_SECONDS": str(args.grace),
            "MELTER_SETTLE_SECONDS": "1",
            "MELTER_DEFAULT_LAYOUT": str(layout),
            "MELTER_MAX_ROOMS": str(args.max_rooms),
            "MELTER_IDLE_ROOM_TTL_SECONDS": str(args.idle_room_ttl),
        }
        self.env.pop("MELTER_CONFIG", None)
        self.r = redis.Redis.from_url(args.redis)
        self.service: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.minute = Tally()
        self.total = Tally()
        self.meetings: list[RealMeeting] = []
        self.samples: list[dict[str, Any]] = []
        self.fake: list[FakeRooms] = []
        self.hostile: Hostile | None = None
        self.stop_at = 0.0
        self.started = 0.0
        self.stats: dict[str, int] = {}
        self.end_holdings: dict[str, int] = {}
        self.last_answer = 0.0  # Unix time, when the last POST was answered
        self.fake_decided = (0, 0)  # finished fake rooms skipped in the service log; finished
        self.cpu_at_start = 0.0
        self.own_cpu = 0.0
        self.fake_renders: Counter[str] = Counter()
        self.rooms_list = (0, 0, 0.0)

    # -- processes -------------------------------------------------------------------------
    def start(self) -> None:
        with (self.base / "serve.log").open("w") as log:
            self.service = subprocess.Popen(
                [sys.executable, "-c", CLI, "serve", "--host", "127.0.0.1", "--port",
                 str(self.port)], env=self.env, cwd=self.base, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        for k in range(self.args.workers):
            with (self.base / f"worker-{k}.log").open("w") as log:
                self.workers.append(subprocess.Popen(
                    [sys.executable, "-m", "melter.farm", "worker", "-c", "1", "-n",
                     f"soak{k}@%h", "--loglevel", "info"], env=self.env, cwd=self.base,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 90
        while True:
            ready = sum(" ready." in (self.base / f"worker-{k}.log").read_text(errors="replace")
                        for k in range(len(self.workers)))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz",
                                            timeout=2) as reply:
                    healthy = reply.status == 200
            except OSError:
                healthy = False
            if healthy and ready == len(self.workers):
                return
            for process in [self.service, *self.workers]:
                assert process is not None
                if process.poll() is not None:
                    raise SystemExit(f"soak: a process exited at start; logs in {self.base}")
            if time.monotonic() > deadline:
                raise SystemExit(f"soak: service or workers not ready; logs in {self.base}")
            time.sleep(0.2)

    def stop(self) -> None:
        processes = [p for p in [self.service, *self.workers] if p is not None]
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)

    def cleanup(self) -> None:
        self.stop()
        with contextlib.suppress(redis.RedisError):
            batch = []
            for key in self.r.scan_iter(match=f"{self.prefix}*", count=5000):
                batch.append(key)
                if len(batch) >= 5000:
                    self.r.unlink(*batch)
                    batch = []
            if batch:
                self.r.unlink(*batch)
        if self.args.keep:
            print(f"soak: kept {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- measurements ----------------------------------------------------------------------
    def measure(self) -> dict[str, Any]:
        """RSS of the service and the workers (with their children), and Redis: the server's
        used_memory, the keys under the prefix and their memory (room keys from a sample, with
        the room indexes ``seen``, ``idle`` and ``by:<client>``), the tracker's counters and
        the rooms per client address."""
        def tree(process: subprocess.Popen | None) -> list[psutil.Process]:
            if process is None or process.poll() is not None:
                return []
            try:
                root = psutil.Process(process.pid)
                return [root, *root.children(recursive=True)]
            except psutil.Error:
                return []

        def tree_rss(process: subprocess.Popen | None) -> int:
            total = 0
            for child in tree(process):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
            return total

        def tree_cpu(process: subprocess.Popen | None) -> float:
            total = 0.0
            for child in tree(process):
                with contextlib.suppress(psutil.Error):
                    times = child.cpu_times()
                    total += times.user + times.system
            return total

        used = int(self.r.info("memory")["used_memory"])
        keys = rooms = 0
        other: list[bytes] = []
        sample: list[bytes] = []
        room_prefix = f"{self.prefix}:svc:room:".encode()
        for key in self.r.scan_iter(match=f"{self.prefix}*", count=5000):
            keys += 1
            if key.startswith(room_prefix):
                rooms += 1
                if len(sample) < 1000:
                    sample.append(key)
                elif random.random() < 0.01:
                    sample[random.randrange(len(sample))] = key
            else:
                other.append(key)
        pipe = self.r.pipeline(transaction=False)
        for key in [*other, *sample]:
            pipe.memory_usage(key, samples=0)
        sizes = [int(s or 0) for s in pipe.execute()]
        other_bytes = sum(sizes[:len(other)])
        indexes = {f"{self.prefix}:svc:seen".encode(), f"{self.prefix}:svc:idle".encode()}
        by_client = f"{self.prefix}:svc:by:".encode()
        seen_bytes = sum(s for k, s in zip(other, sizes, strict=False)
                         if k in indexes or k.startswith(by_client))
        per_room = statistics.fmean(sizes[len(other):]) if sample else 0.0
        room_bytes = per_room * rooms + seen_bytes
        stats = {k.decode(): int(v) for k, v in
                 self.r.hgetall(f"{self.prefix}:svc:stats").items()}
        holdings = self.holdings()
        return {"at": time.monotonic() - self.started,
                "serve_rss": tree_rss(self.service), "serve_cpu": tree_cpu(self.service),
                "workers_rss": sum(tree_rss(w) for w in self.workers),
                "redis_used": used, "keys": keys, "room_keys": rooms,
                "prefix_bytes": other_bytes - seen_bytes + room_bytes,
                "room_bytes": room_bytes, "other_bytes": other_bytes - seen_bytes,
                "forgotten": stats.get("idle_rooms_forgotten", 0),
                "crowded": stats.get("rooms_crowded_out", 0),
                "dropped": stats.get("dropped_room_limit", 0), "holdings": holdings,
                "alive": self.service is not None and self.service.poll() is None}

    def holdings(self) -> dict[str, int]:
        """The rooms followed now by the client address that named them first, as
        ``Tracker.holdings()`` counts them (``P:svc:by:<address>``)."""
        p = f"{self.prefix}:svc"
        clients = sorted(c.decode() for c in self.r.smembers(f"{p}:clients"))
        pipe = self.r.pipeline(transaction=False)
        for client in clients:
            pipe.zcard(f"{p}:by:{client}")
        return {c: int(n) for c, n in zip(clients, pipe.execute(), strict=True) if n}

    def role(self, address: str) -> str:
        """Which of the soak's clients posts from ``address``."""
        last = int(address.rsplit(".", 1)[1]) if address.startswith("127.0.0.") else -1
        if last == REAL_ADDRESS:
            return "real meetings"
        if HOSTILE_ADDRESS <= last < HOSTILE_ADDRESS + self.args.hostile:
            return f"hostile {last - HOSTILE_ADDRESS}"
        if VALID_ADDRESS <= last < VALID_ADDRESS + self.args.valid:
            return f"Janus-like {last - VALID_ADDRESS}"
        return "unknown"

    def by_role(self, holdings: dict[str, int]) -> str:
        """``holdings`` grouped by kind of client: ``hostile .10 4990 .11 4987; ...``."""
        groups: dict[str, list[str]] = {}
        for address, n in sorted(holdings.items(),
                                 key=lambda a: [int(x) for x in a[0].split(".")
                                                if x.isdigit()]):
            kind = self.role(address).split(" ")[0]
            groups.setdefault(kind, []).append(f".{address.rsplit('.', 1)[-1]} {n}")
        return "; ".join(f"{kind} {' '.join(rows)}" for kind, rows in groups.items()) or "none"

    # -- traffic ---------------------------------------------------------------------------
    async def send(self, http: Http, post: Post, group: str) -> tuple[int | None, bytes]:
        began = time.monotonic()
        try:
            status, body = await http.request("POST", "/janus/events", post.body, post.headers,
                                              post.chunked)
        except ClientError as exc:
            took = time.monotonic() - began
            for tally in (self.minute, self.total):
                tally.add(group, post.kind, "error", took, False)
                tally.errors[f"{post.kind}: {exc}"[:120]] += 1
            return None, b""
        took = time.monotonic() - began
        self.last_answer = time.time()
        ok = status in post.expect or status == 429
        for tally in (self.minute, self.total):
            tally.add(group, post.kind, str(status), took, ok)
        return status, body

    async def hostile_client(self, index: int, pacer: Pacer) -> None:
        assert self.hostile is not None
        rng = random.Random(f"hostile-{index}")
        http = Http(self.port, f"127.0.0.{HOSTILE_ADDRESS + index}")
        try:
            while time.monotonic() < self.stop_at:
                await pacer.wait()
                kind = rng.choice(Hostile.KINDS)
                await self.send(http, self.hostile.make(kind, rng, index), "hostile")
        finally:
            await http.close()

    async def valid_client(self, index: int, pacer: Pacer) -> None:
        rooms = FakeRooms(self.auth, index, random.Random(f"valid-{index}"))
        self.fake.append(rooms)
        http = Http(self.port, f"127.0.0.{VALID_ADDRESS + index}")
        try:
            while time.monotonic() < self.stop_at:
                post, last = rooms.make()
                for _ in range(6):  # a 429 is sent again, as Janus retransmits
                    await pacer.wait()
                    status, _ = await self.send(http, post, "valid")
                    if status != 429:
                        break
                    await asyncio.sleep(0.5)
                if last and status == 200:
                    rooms.done()
        finally:
            await http.close()

    async def real_meeting(self, index: int) -> None:
        fixture = MEETINGS[index % len(MEETINGS)]
        lines = [json.loads(x) for x in (FIXTURES / fixture / "events.jsonl").read_text()
                 .splitlines() if x.strip()]
        old = str(next(e["event"]["data"]["room"] for e in lines if e.get("type") == 64))
        room = str(7_000_000 + index)
        meeting = RealMeeting(fixture, room, meeting_span(fixture))
        self.meetings.append(meeting)
        for path in (FIXTURES / fixture).glob("*.mjr"):
            shutil.copy(path, self.recordings / path.name.replace(f"videoroom-{old}-",
                                                                  f"videoroom-{room}-"))
        first = min(int(e["timestamp"]) for e in lines)
        shift = now_us() - first
        for event in lines:
            event["timestamp"] = int(event["timestamp"]) + shift
            data = event.get("event", {}).get("data")
            if event.get("type") == 64 and isinstance(data, dict) and str(data.get("room")) == old:
                data["room"] = int(room)
        lines.sort(key=lambda e: e["timestamp"])
        rng = random.Random(f"meeting-{index}")
        http = Http(self.port, f"127.0.0.{REAL_ADDRESS}")
        meeting.started = time.monotonic()
        try:
            k = 0
            while k < len(lines):
                if self.args.meeting_pace == "real":
                    due = meeting.started + (lines[k]["timestamp"] - first - shift) / 1e6
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                size = rng.randint(1, 5)
                chunk = lines[k:k + size]
                k += size
                body = json.dumps(chunk).encode()
                if rng.random() < 0.5:
                    body = zlib.compress(body)
                post = Post("real", body, frozenset({200}),
                            {"Content-Type": "application/json", "Authorization": self.auth})
                for attempt in range(6):  # sampleevh: max_retransmissions = 5
                    status, _ = await self.send(http, post, "real")
                    if status == 200:
                        meeting.posts += 1
                        if any(e.get("type") == 64 and e["event"]["data"].get("event")
                               == "destroyed" for e in chunk):
                            meeting.destroyed = time.time()
                        break
                    meeting.retried += 1
                    await asyncio.sleep(0.1 * 2**attempt)
                else:
                    meeting.failed_posts += 1
            meeting.posted = time.monotonic()
        finally:
            await http.close()
        await self.follow(meeting)

    async def api(self, http: Http, path: str) -> Any:
        status, body = await http.request("GET", path,
                                          headers={"Authorization": f"Bearer {self.token}"})
        if status != 200:
            raise ClientError(f"GET {path}: HTTP {status}: {body[:200]!r}")
        return json.loads(body)

    async def follow(self, meeting: RealMeeting) -> None:
        """Wait for the meeting's render to end (at most --render-timeout s)."""
        http = Http(self.port, "127.0.0.3")
        deadline = meeting.posted + self.args.render_timeout
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(ClientError):
                    jobs = await self.api(http, f"/jobs?room={meeting.room}")
                    if jobs and jobs[0]["state"] in ("done", "failed", "cancelled"):
                        meeting.job = jobs[0]
                        return
                await asyncio.sleep(1.0)
        finally:
            await http.close()

    async def meetings_loop(self) -> None:
        tasks = []
        index = 0
        next_at = time.monotonic() + 2.0
        while next_at < self.stop_at:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            tasks.append(asyncio.create_task(self.real_meeting(index)))
            index += 1
            next_at += self.args.meeting_every
        await asyncio.gather(*tasks)

    async def monitor(self) -> None:
        minute = 1
        began = time.monotonic()
        total = self.args.minutes * 60
        while True:
            end = self.started + min(minute * 60.0, total)
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            sample = await asyncio.to_thread(self.measure)
            tally, self.minute = self.minute, Tally()
            seconds = time.monotonic() - began
            began = time.monotonic()
            sample["minute"] = minute
            sample["rate"] = sum(tally.sent.values()) / seconds
            before = self.samples[-1]["serve_cpu"] if self.samples else self.cpu_at_start
            sample["serve_cpu_share"] = (sample["serve_cpu"] - before) / seconds
            self.samples.append(sample)
            self.report(sample, tally)
            if end >= self.started + total:
                self.own_cpu += time.process_time()
                return
            minute += 1

    def report(self, sample: dict[str, Any], tally: Tally) -> None:
        latency = sorted(tally.latency) or [0.0]
        p50 = latency[len(latency) // 2] * 1000
        p99 = latency[min(len(latency) - 1, int(len(latency) * 0.99))] * 1000
        sent = " ".join(f"{k} {tally.sent[k]}" for k in ("hostile", "valid", "real"))
        statuses = " ".join(f"{k}:{v}" for k, v in sorted(tally.status.items()))
        at = round(sample["at"])
        line = (f"[{at // 60:2d}:{at % 60:02d}] sent {sent} | {statuses} | "
                f"{sample['rate']:.0f} req/s, p50 {p50:.0f} ms p99 {p99:.0f} ms | serve CPU "
                f"{sample['serve_cpu_share'] * 100:.0f}% RSS "
                f"{sample['serve_rss'] / MB:.1f} MB (workers {sample['workers_rss'] / MB:.0f} "
                f"MB) | Redis used_memory {sample['redis_used'] / MB:.1f} MB, prefix "
                f"{sample['keys']} keys ({sample['room_keys']} rooms) "
                f"{sample['prefix_bytes'] / MB:.1f} MB | idle rooms forgotten "
                f"{sample['forgotten']}, rooms crowded out {sample['crowded']}, events "
                f"dropped at the limit {sample['dropped']} | rooms by client address: "
                f"{self.by_role(sample['holdings'])}")
        print(line, flush=True)

    async def run(self) -> None:
        self.hostile = Hostile(self.auth, self.token)
        self.cpu_at_start = (await asyncio.to_thread(self.measure))["serve_cpu"]
        self.started = time.monotonic()
        self.own_cpu = -time.process_time()
        self.stop_at = self.started + self.args.minutes * 60
        pacer = Pacer(self.args.rate)
        clients = [self.hostile_client(k, pacer) for k in range(self.args.hostile)]
        clients += [self.valid_client(k, pacer) for k in range(self.args.valid)]
        await asyncio.gather(self.monitor(), self.meetings_loop(), *clients)

    # -- the verdict -----------------------------------------------------------------------
    def verdict(self) -> list[str]:
        problems: list[str] = []
        api = f"http://127.0.0.1:{self.port}"

        def get(path: str) -> Any:
            request = urllib.request.Request(api + path,
                                             headers={"Authorization": f"Bearer {self.token}"})
            with urllib.request.urlopen(request, timeout=30) as reply:
                return json.loads(reply.read())

        def room_state(room: str) -> dict[str, Any] | None:
            """The room as ``GET /rooms/{room}`` shows it; None when the service does not
            follow it (404: its events were dropped at MELTER_MAX_ROOMS, or it expired)."""
            try:
                return dict(get(f"/rooms/{room}"))
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
                raise

        # The rooms still in their grace period or waiting to be submitted are decided
        # within the grace and settle times once the traffic stops.
        deadline = time.monotonic() + 30
        p = f"{self.prefix}:svc"
        while (self.r.scard(f"{p}:pending") or self.r.zcard(f"{p}:due")) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        left = {"pending": self.r.scard(f"{p}:pending"), "due": self.r.zcard(f"{p}:due")}
        if any(left.values()):
            problems.append(f"rooms still undecided 30 s after the traffic: {left}")
        self.stats = {k.decode(): int(v) for k, v in
                      self.r.hgetall(f"{self.prefix}:svc:stats").items()}
        self.end_holdings = self.holdings()
        skipped = self.skipped_in_log()
        finished = [room for f in self.fake for room in f.all_finished]
        missing = [room for room in finished if room not in skipped]
        twice = [room for room in finished if len(skipped.get(room, ())) > 1]
        self.fake_decided = (len(finished) - len(missing), len(finished))
        if missing:
            problems.append(f"{len(missing)} of {len(finished)} finished fake rooms without "
                            f"their render skipped for want of recordings in the service log "
                            f"(not followed to their end), e.g. {', '.join(missing[:3])}")
        if twice:
            problems.append(f"{len(twice)} fake rooms skipped more than once in the service "
                            f"log, e.g. {', '.join(twice[:3])}")
        unfollowed: list[str] = []
        for rooms_of_client in self.fake:
            for room, destroyed in rooms_of_client.finished[-20:]:
                state = room_state(room)
                if state is None:
                    decided = skipped.get(room, [])
                    if decided and max(decided) < self.last_answer:
                        self.fake_renders["skipped (no recordings), then forgotten as idle "
                                          "(404)"] += 1
                    else:
                        unfollowed.append(room)
                        self.fake_renders["not followed (404)"] += 1
                    continue
                meetings = state["meetings"] or [{}]
                render = meetings[-1].get("render") or {}
                ended = meetings[-1].get("ended_by")
                why = "no recordings" if "no recordings" in str(render.get("error")) else \
                    render.get("error")
                self.fake_renders[f"{render.get('state')} ({ended}, {why})"] += 1
                if render.get("state") != "skipped" or why != "no recordings" or ended != (
                        "destroyed" if destroyed else "empty"):
                    problems.append(f"fake room {room}: render {render}, ended by {ended}")
        if unfollowed:
            problems.append(f"{len(unfollowed)} of the last fake rooms not followed by the "
                            f"service (404) without their render skipped before the last POST "
                            f"was answered, e.g. {', '.join(unfollowed[:3])}")
        all_jobs = get("/jobs?limit=1000")
        began = time.monotonic()
        rooms = get("/rooms")
        self.rooms_list = (len(rooms["rooms"]), len(json.dumps(rooms)),
                           time.monotonic() - began)
        stats = {k.decode(): int(v) for k, v in
                 self.r.hgetall(f"{self.prefix}:svc:stats").items()}
        for meeting in self.meetings:
            jobs = [j for j in all_jobs if str(j["spec"].get("room")) == meeting.room]
            meeting.jobs = len(jobs)
            if len(jobs) != 1:
                followed = "" if jobs or room_state(meeting.room) is not None else \
                    ", the room not followed by the service (404)"
                problems.append(f"room {meeting.room} ({meeting.fixture}): {len(jobs)} "
                                f"jobs{followed}")
                continue
            job = jobs[0]
            if job["state"] != "done":
                problems.append(f"room {meeting.room}: job {job['id']} {job['state']}: "
                                f"{str(job.get('error'))[:200]}")
                continue
            output = Path(job["outputs"][0])
            if not output.is_file():
                problems.append(f"room {meeting.room}: no output {output}")
                continue
            meeting.duration = media_duration(output)
            if abs(meeting.duration - meeting.span) > DURATION_TOLERANCE:
                problems.append(f"room {meeting.room}: output {meeting.duration:.3f} s, "
                                f"meeting {meeting.span:.3f} s")
            if meeting.failed_posts:
                problems.append(f"room {meeting.room}: {meeting.failed_posts} POSTs failed")
        if len(all_jobs) != len(self.meetings):
            problems.append(f"{len(all_jobs)} jobs in the farm for {len(self.meetings)} "
                            "real meetings")
        renders = sorted(p.name for p in self.renders.rglob("*") if p.is_file()
                         and p.suffix == ".mp4") if self.renders.is_dir() else []
        if len(renders) != len(self.meetings):
            problems.append(f"{len(renders)} .mp4 files in the renders folder: {renders}")
        fives = {k: v for k, v in self.total.status.items() if k.startswith("5")}
        if fives:
            problems.append(f"5xx answers: {fives}")
        if self.total.errors:
            problems.append(f"requests without an answer: {dict(self.total.errors)}")
        if self.total.unexpected:
            problems.append(f"unexpected answers: {dict(self.total.unexpected)}")
        if stats.get("room_failures") or rooms["failed"]:
            problems.append(f"rooms failed: {stats.get('room_failures')} "
                            f"{list(rooms['failed'])[:5]}")
        if stats.get("auto_submitted", 0) != len(self.meetings):
            problems.append(f"auto renders submitted: {stats.get('auto_submitted')}, "
                            f"real meetings {len(self.meetings)}")
        if not self.samples or not self.samples[-1]["alive"]:
            problems.append("the service died")
        problems += self.flatness()
        self.stats = stats
        self.rooms_view = rooms
        return problems

    def skipped_in_log(self) -> dict[str, list[float]]:
        """The rooms whose meeting's render the service skipped for want of recordings, with
        when (Unix time), from its log (``meeting <room>-<µs>: not rendered: no recordings
        of room <room> ...``)."""
        found: dict[str, list[float]] = {}
        log = self.base / "serve.log"
        if not log.is_file():
            return found
        with log.open(errors="replace") as lines:
            for line in lines:
                match = SKIPPED_LINE.match(line)
                if match:
                    at = dt.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                    found.setdefault(match[2], []).append(at)
        return found

    @staticmethod
    def flat_limit(base: float) -> float:
        return base + max(FLAT_SHARE * base, FLAT_BYTES)

    def flatness(self) -> list[str]:
        """Keys under the prefix within ``--max-rooms`` + KEY_SLACK in every minute; from
        minute 2 (the warm-up over) to the last, Redis used_memory (the whole server) and the
        service's RSS within FLAT_SHARE or FLAT_BYTES of minute 2."""
        problems: list[str] = []
        if not self.samples:
            return problems
        bound = self.args.max_rooms + KEY_SLACK
        most = max(self.samples, key=lambda s: s["keys"])
        if most["keys"] > bound:
            problems.append(f"{most['keys']} keys under the prefix at minute "
                            f"{most['minute']} ({most['room_keys']} rooms), over "
                            f"MELTER_MAX_ROOMS + {KEY_SLACK} = {bound}")
        if len(self.samples) < 3:
            return problems
        base, after = self.samples[1], self.samples[1:]
        for key, name in (("redis_used", "Redis used_memory"), ("serve_rss", "service RSS")):
            top = max(after, key=lambda s, key=key: s[key])
            grew = top[key] - base[key]
            if top[key] > self.flat_limit(base[key]):
                problems.append(f"{name} grew {grew / MB:.1f} MB after the warm-up: "
                                f"{base[key] / MB:.1f} MB at minute 2, {top[key] / MB:.1f} "
                                f"MB at minute {top['minute']}")
        return problems

    def summary(self, problems: list[str]) -> list[str]:
        total = self.total
        seconds = self.args.minutes * 60
        out = []
        requests = sum(total.sent.values())
        out.append(f"soak: {seconds:.0f} s, {requests} POSTs ("
                   + ", ".join(f"{k} {total.sent[k]}" for k in ("hostile", "valid", "real"))
                   + f"), {requests / seconds:.0f} a second; answers "
                   + ", ".join(f"{k}: {v}" for k, v in sorted(total.status.items())))
        shares = [s["serve_cpu_share"] for s in self.samples] or [0.0]
        out.append(f"CPU: the service {statistics.fmean(shares) * 100:.0f}% of a core on "
                   f"average, this load generator {self.own_cpu / seconds * 100:.0f}%")
        latency = sorted(total.latency) or [0.0]
        out.append(f"answer times: p50 {latency[len(latency) // 2] * 1000:.1f} ms, p99 "
                   f"{latency[int(len(latency) * 0.99)] * 1000:.0f} ms, max "
                   f"{latency[-1] * 1000:.0f} ms")
        out.append("hostile by kind: " + "; ".join(
            f"{kind} {sum(c.values())} ("
            + ", ".join(f"{s}: {n}" for s, n in sorted(c.items())) + ")"
            for kind, c in sorted(total.by_kind.items()) if kind not in ("valid", "real")))
        fake_rooms = sum(f.rooms for f in self.fake)
        out.append(f"fake rooms: {fake_rooms} started, {sum(f.destroyed for f in self.fake)} "
                   f"of them destroyed, {self.fake_decided[1]} finished, "
                   f"{self.fake_decided[0]} of these skipped for want of recordings (service "
                   f"log); the last 20 of each client: {dict(self.fake_renders)}")
        named = ("events", "idle_rooms_forgotten", "rooms_crowded_out", "dropped_room_limit",
                 "auto_submitted")
        out.append("tracker: " + ", ".join(
            [f"{k} {self.stats.get(k, 0)}" for k in named]
            + [f"{k} {v}" for k, v in sorted(self.stats.items()) if k not in named]))
        out.append("rooms by client address at the end: " + (", ".join(
            f"{address} ({self.role(address)}) {n}"
            for address, n in sorted(self.end_holdings.items(), key=lambda a: [
                int(x) for x in a[0].split(".") if x.isdigit()])) or "none"))
        out.append("answer times by kind (p50/p99 ms): " + ", ".join(
            f"{kind} {statistics.median(v) * 1000:.0f}/"
            f"{sorted(v)[int(len(v) * 0.99)] * 1000:.0f}"
            for kind, v in sorted(total.kind_latency.items())))
        for m in self.meetings:
            out.append(
                f"real meeting room {m.room} ({m.fixture}, span {m.span:.3f} s): {m.posts} "
                f"POSTs ({m.retried} retried), {m.jobs} job(s), {m.timings()}, "
                + (f"output {m.duration:.3f} s" if m.duration is not None else "no output"))
        if self.samples:
            first, last = self.samples[0], self.samples[-1]
            base = self.samples[1] if len(self.samples) >= 3 else None

            def row(name: str, key: str, scale: float = MB, unit: str = "MB") -> str:
                top = max(self.samples, key=lambda s: s[key])
                warm = f"minute 2 {base[key] / scale:.1f} {unit}, " if base else ""
                return (f"{name}: first minute {first[key] / scale:.1f} {unit}, {warm}last "
                        f"minute {last[key] / scale:.1f} {unit}, max {top[key] / scale:.1f} "
                        f"{unit} (minute {top['minute']})")

            out.append(row("service RSS", "serve_rss"))
            out.append(row("workers RSS", "workers_rss"))
            out.append(row("Redis used_memory (whole server)", "redis_used"))
            out.append(row("Redis under the prefix", "prefix_bytes"))
            out.append(row("  of which rooms", "room_bytes"))
            out.append(row("  the rest", "other_bytes", 1024, "kB"))
            most = max(self.samples, key=lambda s: s["keys"])
            out.append(f"keys under the prefix: first minute {first['keys']}, "
                       + (f"minute 2 {base['keys']}, " if base else "")
                       + f"last minute {last['keys']}, max {most['keys']} (minute "
                       f"{most['minute']}); bound MELTER_MAX_ROOMS + {KEY_SLACK} = "
                       f"{self.args.max_rooms + KEY_SLACK}")
            if base is None:
                out.append("memory flatness: not checked (fewer than three minutes)")
            else:
                out.append(
                    "memory flatness after the warm-up: at most "
                    f"max({FLAT_SHARE:.0%}, {FLAT_BYTES // MB} MB) over minute 2, that is "
                    f"Redis used_memory <= {self.flat_limit(base['redis_used']) / MB:.1f} MB, "
                    f"service RSS <= {self.flat_limit(base['serve_rss']) / MB:.1f} MB")
            per_room = last["room_bytes"] / max(1, last["room_keys"])
            out.append(f"rooms: {last['room_keys']} held at the end ({per_room:.0f} B each "
                       f"with their index entries); at most MELTER_MAX_ROOMS = "
                       f"{self.args.max_rooms} are followed, so rooms hold at most "
                       f"{self.args.max_rooms * per_room / MB:.1f} MB whatever is posted; "
                       f"idle rooms expire after {self.args.idle_room_ttl:g} s")
        listed, size, took = self.rooms_list
        out.append(f"GET /rooms at the end: {listed} rooms, {size / MB:.1f} MB in {took:.2f} s")
        log = self.base / "serve.log"
        if log.is_file():
            out.append(f"service log: {log.stat().st_size / MB:.1f} MB")
        out.append("result: " + ("PASS" if not problems else "FAIL"))
        out += [f"  problem: {p}" for p in problems]
        return out


def take_snapshot(kind: str, folder: Path) -> Path:
    """A copy of the ``melter`` package to run the service and workers from, so that edits
    made to the working tree meanwhile do not reach them: the working tree's (``tree``) or the
    last commit's (``head``, with the working tree's compiled passes). The built-in layouts go
    where an installed package has them (``melter/layout/builtin``)."""
    folder.mkdir(parents=True)
    if kind == "head":
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "melter",
                                  "layouts"], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
        for compiled in (ROOT / "melter").glob("_fastpath*.so"):
            shutil.copy(compiled, folder / "melter" / compiled.name)
    else:
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(ROOT / "melter", folder / "melter", ignore=ignore)
        shutil.copytree(ROOT / "layouts", folder / "layouts", ignore=ignore)
    shutil.copytree(folder / "layouts", folder / "melter" / "layout" / "builtin",
                    dirs_exist_ok=True)
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="most POSTs a second of the hostile and valid clients together "
                        "(default: as fast as the service answers)")
    parser.add_argument("--hostile", type=int, default=4, help="hostile clients (default 4)")
    parser.add_argument("--valid", type=int, default=4, help="valid clients (default 4)")
    parser.add_argument("--workers", type=int, default=1, help="farm workers (default 1)")
    parser.add_argument("--meeting-every", type=float, default=60.0,
                        help="seconds between real meetings (default 60)")
    parser.add_argument("--meeting-pace", choices=["real", "burst"], default="real",
                        help="post a real meeting's events at Janus's pace, or all at once")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="the service's MELTER_GRACE_SECONDS (default 5)")
    parser.add_argument("--max-rooms", type=int, default=20000,
                        help="the service's MELTER_MAX_ROOMS (default 20000)")
    parser.add_argument("--idle-room-ttl", type=float, default=600.0,
                        help="the service's MELTER_IDLE_ROOM_TTL_SECONDS (default 600)")
    parser.add_argument("--render-timeout", type=float, default=300.0,
                        help="seconds a real meeting's render may take after its last POST")
    parser.add_argument("--redis", default=os.environ.get(
        "MELTER_SOAK_REDIS", "redis://127.0.0.1:6379/14"),
        help="Redis URL, a database of its own (default redis://127.0.0.1:6379/14)")
    parser.add_argument("--snapshot", choices=["none", "tree", "head"], default="none",
                        help="run the service and workers from a copy of the package taken at "
                        "the start: of the working tree, or of the last commit (default: the "
                        "working tree itself)")
    parser.add_argument("--keep", action="store_true", help="keep the folder and its logs")
    args = parser.parse_args(argv)
    soak = Soak(args)
    try:
        soak.r.ping()
    except redis.RedisError as exc:
        shutil.rmtree(soak.base, ignore_errors=True)
        print(f"soak: no Redis at {args.redis}: {exc}", file=sys.stderr)
        return 2
    problems: list[str] = []
    try:
        soak.start()
        print(f"soak: melter serve on 127.0.0.1:{soak.port}, "
              f"{args.workers} worker(s), Redis {args.redis} prefix {soak.prefix}, folder "
              f"{soak.base}; {args.minutes:g} min, {args.hostile} hostile and {args.valid} "
              f"valid clients, rate {'unlimited' if args.rate <= 0 else args.rate}; "
              f"MELTER_MAX_ROOMS={args.max_rooms}, "
              f"MELTER_IDLE_ROOM_TTL_SECONDS={args.idle_room_ttl:g}",
              flush=True)
        asyncio.run(_run(soak))
        try:
            problems = soak.verdict()
        except (OSError, redis.RedisError, ValueError, KeyError) as exc:
            problems = [f"results not checked: {type(exc).__name__}: {exc}"]
        for line in soak.summary(problems):
            print(line, flush=True)
    finally:
        soak.cleanup()
    return 0 if not problems else 1


async def _run(soak: Soak) -> None:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    await soak.run()


if __name__ == "__main__":
    sys.exit(main())
