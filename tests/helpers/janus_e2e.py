"""A real Janus meeting on this machine: Janus in a network namespace, aiortc publishers, events.

Janus 1.1.2 gathers no ICE candidates on loopback interfaces, so it runs in its own network
namespace joined to the host by a veth pair with addresses in 198.18.0.0/15 (reserved for
benchmarks): every packet stays on this machine. The publishers (aiortc, on the host side of
the pair) join a VideoRoom through Janus's HTTP API and send a solid colour and a sine tone
each; the room records (``record: true``) and Janus's sample event handler POSTs every event to
a URL on the host side — a :class:`EventReceiver` here, or ``melter serve``.

What each publisher sent, and when, is kept by wall clock (:class:`MeetingLog`): the truth a
rendered meeting is measured against.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

JANUS = Path("/usr/bin/janus")
#: The block the namespaces' /30 links are cut from: in 198.18.0.0/15 (reserved for
#: benchmarks), away from the project's other test networks (the swarm plan's 198.18.0.0/24 and
#: the deployment tests' Docker pools in 198.18.127.0/24 and 198.18.128.0/17).
LINK_BLOCK = ipaddress.ip_network("198.19.192.0/18")
JANUS_HTTP_PORT = 8088
#: Event types melter needs: sessions and handles (who is connected), plugins (VideoRoom's
#: joined/published/unpublished/leaving/destroyed), WebRTC and JSEP (PeerConnection state),
#: core (server startup and shutdown). Media statistics and transport requests are left out.
EVENT_MASK = "sessions,handles,jsep,webrtc,plugins,core"


def skip_reason() -> str | None:
    """Why a real Janus meeting cannot run here, or ``None`` when it can."""
    if os.geteuid() != 0:
        return "needs root to create a network namespace for Janus"
    if shutil.which("ip") is None:
        return "needs `ip` (Debian iproute2) for the network namespace"
    if not JANUS.exists():
        return f"needs {JANUS} (Debian janus 1.1.2)"
    if janus_lib_dir() is None:
        return "Janus's plugin folder (libjanus_videoroom.so) is not installed"
    try:
        import aiortc  # noqa: F401
    except ImportError:
        return "needs aiortc for the WebRTC publishers"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` does not work here: {probe.stderr.strip()}"
    return None


def janus_lib_dir() -> Path | None:
    """The Debian package's module folder (``/usr/lib/<multiarch>/janus``)."""
    for plugin in sorted(Path("/usr/lib").glob("*/janus/plugins/libjanus_videoroom.so")):
        return plugin.parent.parent
    return None


# --- the network namespace ----------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A network namespace joined to the host by a veth pair (a /30: host .1, namespace .2)."""

    netns: str
    host_if: str
    janus_if: str
    host_ip: str
    janus_ip: str


class NamespaceError(RuntimeError):
    """The namespace or its veth pair could not be made (e.g. root without CAP_SYS_ADMIN)."""


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise NamespaceError(f"{' '.join(args)}: {done.stderr.strip()}")


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Networks of the host's addresses and routes: a new link must overlap none of them."""
    nets = []
    addrs = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for line in addrs.splitlines():
        words = line.split()
        if "inet" in words:
            nets.append(ipaddress.ip_interface(words[words.index("inet") + 1]).network)
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for line in routes.splitlines():
        destination = line.split()[0] if line.strip() else "default"
        if destination != "default":
            nets.append(ipaddress.ip_network(destination, strict=False))
    return [n for n in nets if isinstance(n, ipaddress.IPv4Network)]


def _free_link_net(seed: int) -> ipaddress.IPv4Network:
    """A /30 of :data:`LINK_BLOCK` that overlaps no network on the host."""
    used = _networks_in_use()
    nets = [ipaddress.IPv4Network(n) for n in LINK_BLOCK.subnets(new_prefix=30)]
    for step in range(len(nets)):
        net = nets[(seed + step) % len(nets)]
        if not any(net.overlaps(other) for other in used):
            return net
    raise RuntimeError(f"no free /30 left in {LINK_BLOCK}")


@contextlib.contextmanager
def network_namespace(tag: str | None = None) -> Iterator[Link]:
    """Create the namespace and its veth pair; delete both afterwards, even on failure."""
    tag = tag or str(os.getpid())
    net = _free_link_net(os.getpid())
    host_ip, janus_ip = (str(h) for h in net.hosts())
    # Interface names are limited to 15 bytes.
    link = Link(f"melter-janus-{tag}", f"mjh{tag}"[:15], f"mjn{tag}"[:15], host_ip, janus_ip)
    _run("ip", "netns", "add", link.netns)
    try:
        _run("ip", "link", "add", link.host_if, "type", "veth", "peer", "name", link.janus_if)
        _run("ip", "link", "set", link.janus_if, "netns", link.netns)
        _run("ip", "addr", "add", f"{host_ip}/30", "dev", link.host_if)
        _run("ip", "link", "set", link.host_if, "up")
        inside = ("ip", "netns", "exec", link.netns)
        _run(*inside, "ip", "addr", "add", f"{janus_ip}/30", "dev", link.janus_if)
        _run(*inside, "ip", "link", "set", link.janus_if, "up")
        _run(*inside, "ip", "link", "set", "lo", "up")
        yield link
    finally:
        # Deleting the namespace deletes its end of the pair, and with it the host's end.
        subprocess.run(["ip", "netns", "delete", link.netns], capture_output=True)
        subprocess.run(["ip", "link", "delete", link.host_if], capture_output=True)


# --- Janus --------------------------------------------------------------------------------


def _jcfg(sections: dict[str, dict[str, Any]]) -> str:
    """libconfig text for Janus's ``.jcfg`` files (strings, numbers and booleans only)."""
    lines = []
    for name, values in sections.items():
        lines.append(f"{name}: {{")
        for key, value in values.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, int | float):
                text = str(value)
            else:
                text = json.dumps(str(value))
            lines.append(f"\t{key} = {text}")
        lines.append("}")
    return "\n".join(lines) + "\n"


def _disable_all_but(folder: Path, keep: str) -> str:
    """Janus loads every module in a folder unless disabled: name all but ``keep``."""
    return ",".join(sorted(p.name for p in folder.glob("libjanus_*.so") if p.name != keep))


@dataclass
class Janus:
    """Janus inside ``link.netns`` with a generated configuration folder under ``workdir``."""

    link: Link
    workdir: Path
    events_backend: str
    events_user: str | None = None
    events_password: str | None = None
    #: the sample event handler's ``compress``: zlib-compressed POST bodies
    events_compress: bool = False
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.link.janus_ip}:{JANUS_HTTP_PORT}/janus"

    @property
    def log_path(self) -> Path:
        return self.workdir / "janus.log"

    def write_config(self) -> Path:
        libs = janus_lib_dir()
        assert libs is not None
        conf = self.workdir / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "janus.jcfg").write_text(_jcfg({
            "general": {
                "configs_folder": str(conf),
                "plugins_folder": str(libs / "plugins"),
                "transports_folder": str(libs / "transports"),
                "events_folder": str(libs / "events"),
                "loggers_folder": str(libs / "loggers"),
                "debug_level": 4,
                "server_name": "melter-e2e",
                # The namespace has no default route for Janus to find its address by.
                "interface": self.link.janus_ip,
                "session_timeout": 60,
            },
            # Candidates only on the namespace's end of the veth pair.
            "nat": {"ice_enforce_list": self.link.janus_if, "ignore_mdns": True},
            "media": {"rtp_port_range": "20000-20999"},
            "plugins": {"disable": _disable_all_but(libs / "plugins", "libjanus_videoroom.so")},
            "transports": {"disable": _disable_all_but(libs / "transports", "libjanus_http.so")},
            "loggers": {"disable": _disable_all_but(libs / "loggers", "")},
            "events": {
                "broadcast": True,
                "disable": _disable_all_but(libs / "events", "libjanus_sampleevh.so"),
                "stats_period": 5,
            },
        }))
        (conf / "janus.transport.http.jcfg").write_text(_jcfg({
            "general": {"json": "compact", "base_path": "/janus", "http": True,
                        "port": JANUS_HTTP_PORT, "ip": self.link.janus_ip, "https": False},
            "admin": {"admin_http": False, "admin_https": False},
        }))
        # No rooms from the file: the test creates its room through the API.
        (conf / "janus.plugin.videoroom.jcfg").write_text(_jcfg({"general": {}}))
        handler: dict[str, Any] = {
            "enabled": True, "events": EVENT_MASK, "grouping": True, "json": "compact",
            "backend": self.events_backend, "max_retransmissions": 5,
            "retransmissions_backoff": 100,
        }
        if self.events_compress:
            handler["compress"] = True
        if self.events_user is not None:
            handler["backend_user"] = self.events_user
            handler["backend_pwd"] = self.events_password or ""
        (conf / "janus.eventhandler.sampleevh.jcfg").write_text(_jcfg({"general": handler}))
        return conf

    def start(self, timeout: float = 15.0) -> None:
        """Start Janus and wait until its HTTP API answers ``info``."""
        conf = self.write_config()
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.link.netns, str(JANUS), "-F", str(conf),
             "-C", str(conf / "janus.jcfg"), "-o", "-e"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Janus exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                info = http_json("GET", self.url + "/info", timeout=1.0)
                if info.get("janus") == "server_info":
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"Janus did not answer within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def http_json(method: str, url: str, body: dict | None = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


# --- the Janus API, over HTTP --------------------------------------------------------------


class JanusError(RuntimeError):
    pass


#: Janus API requests get threads of their own: in the loop's default executor they would
#: queue behind aiortc's encoders, and a request's time would no longer be when it was sent.
_API_THREADS = ThreadPoolExecutor(8, thread_name_prefix="janus-api")


@dataclass(frozen=True)
class Reply:
    """A plugin's answer, and when its request left (wall clock, taken on the sending thread)."""

    data: dict
    jsep: dict | None
    sent: float


class JanusSession:
    """One Janus API session: requests by POST, events by long poll on a daemon thread.

    Plugin requests that Janus answers later (``ack``, then an event with the same
    transaction) resolve when the poller sees that event.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.id = 0
        self._loop = asyncio.get_running_loop()
        self._pending: dict[str, asyncio.Future[dict]] = {}
        self._count = 0
        self._closed = threading.Event()
        self.events: list[dict] = []

    async def _post(self, path: str, body: dict) -> tuple[dict, float]:
        """Janus's answer (the event, for an ``ack``) and when the request was sent."""
        self._count += 1
        transaction = body.setdefault("transaction", f"t{id(self)}-{self._count}")
        future: asyncio.Future[dict] = self._loop.create_future()
        self._pending[transaction] = future

        def send() -> tuple[Any, float]:
            sent = time.time()
            return http_json("POST", self.url + path, body), sent

        try:
            reply, sent = await self._loop.run_in_executor(_API_THREADS, send)
            if reply.get("janus") == "error":
                raise JanusError(f"{body.get('janus')}: {reply['error']}")
            if reply.get("janus") != "ack":
                return reply, sent
            return await asyncio.wait_for(future, 20.0), sent
        finally:
            self._pending.pop(transaction, None)

    async def create(self) -> None:
        reply, _ = await self._post("", {"janus": "create"})
        self.id = reply["data"]["id"]
        threading.Thread(target=self._poll, daemon=True, name=f"janus-poll-{self.id}").start()

    async def attach(self, plugin: str = "janus.plugin.videoroom") -> int:
        reply, _ = await self._post(f"/{self.id}", {"janus": "attach", "plugin": plugin})
        return int(reply["data"]["id"])

    async def message(self, handle: int, body: dict, jsep: dict | None = None) -> Reply:
        """A plugin request, answered at once or later (Janus's ``ack``, then an event)."""
        request: dict[str, Any] = {"janus": "message", "body": body}
        if jsep is not None:
            request["jsep"] = jsep
        reply, sent = await self._post(f"/{self.id}/{handle}", request)
        data = reply.get("plugindata", {}).get("data", {})
        if "error" in data:
            raise JanusError(f"{body.get('request')}: {data['error']} ({data.get('error_code')})")
        return Reply(data, reply.get("jsep"), sent)

    async def keepalive(self) -> None:
        await self._post(f"/{self.id}", {"janus": "keepalive"})

    async def destroy(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError, JanusError):
            await self._post(f"/{self.id}", {"janus": "destroy"})

    def _poll(self) -> None:
        while not self._closed.is_set():
            try:
                got = http_json("GET", f"{self.url}/{self.id}?maxev=10", timeout=40.0)
            except (OSError, ValueError, http.client.HTTPException):
                # A destroyed session ends its long poll abruptly.
                if self._closed.wait(0.2):
                    return
                continue
            for event in got if isinstance(got, list) else [got]:
                if isinstance(event, dict) and event.get("janus") != "keepalive":
                    try:
                        self._loop.call_soon_threadsafe(self._deliver, event)
                    except RuntimeError:  # the loop is closed: the meeting is over
                        return

    def _deliver(self, event: dict) -> None:
        self.events.append(event)
        future = self._pending.get(event.get("transaction", ""))
        if future is not None and not future.done() and event.get("janus") in ("event", "success"):
            future.set_result(event)


# --- synthetic media -----------------------------------------------------------------------

#: Sync markers: for :data:`FLASH_S` at every multiple of :data:`MARKER_PERIOD_S` of a
#: publisher's media clock (from the first one on), its picture is white and its tone doubled.
MARKER_PERIOD_S = 5
FLASH_S = Fraction(1, 10)
AUDIO_RATE = 48000
#: Samples per 20 ms audio frame.
AUDIO_FRAME = 960


class MediaClock:
    """One publisher's media clock, shared by its audio and video tracks.

    Its zero ``Z`` is the first ``recv`` of either track: video frame ``n`` is due at
    ``Z + n / fps`` and audio sample ``s`` at ``Z + s / 48000``, and the frames' pts follow
    that clock, so both tracks' RTP timestamps count from the same instant.
    """

    def __init__(self) -> None:
        self.zero: float | None = None  # time.monotonic()
        self.zero_wall: float | None = None  # the same instant, seconds since the epoch

    def start(self) -> float:
        """Start the clock if it has not started yet; its zero (monotonic seconds)."""
        if self.zero is None:
            before = time.time()
            self.zero = time.monotonic()
            after = time.time()
            self.zero_wall = (before + after) / 2
        return self.zero


class _Paced:
    """Wall-clock pacing of one track on a (shared) :class:`MediaClock`.

    Item ``n`` is due at ``Z + n / rate``. A track whose first ``recv`` comes after the clock
    started begins with the item due then (the latest one not in the future), without a burst
    to catch up on the ones before.
    """

    def __init__(self, rate: Fraction | int, clock: MediaClock | None = None) -> None:
        self.rate = Fraction(rate)  # items per second
        self.clock = clock if clock is not None else MediaClock()
        self.first: int | None = None  # the first item's number
        self.count = 0  # items handed out
        self.first_wall: float | None = None  # wall clock of the first recv

    async def next(self) -> int:
        zero = self.clock.start()
        now = time.monotonic()
        if self.first is None:
            self.first_wall = time.time()
            self.first = max(0, int((now - zero) * self.rate))
        else:
            delay = zero + float((self.first + self.count) / self.rate) - now
            if delay > 0:
                await asyncio.sleep(delay)
        self.count += 1
        return self.first + self.count - 1


def flash_frame(n: int, fps: int) -> bool:
    """Whether video frame ``n`` (due at ``n / fps``) lies in a marker's white flash."""
    t = Fraction(n, fps)
    return t >= MARKER_PERIOD_S and t % MARKER_PERIOD_S < FLASH_S


def doubled_before(s: np.ndarray, rate: int = AUDIO_RATE) -> np.ndarray:
    """For samples ``s``: how many samples before each are in a marker (tone doubled)."""
    period = MARKER_PERIOD_S * rate
    flash = int(FLASH_S * rate)
    k = s // period
    return np.where(k >= 1, (k - 1) * flash + np.minimum(s % period, flash), 0)


def colour_track(rgb: tuple[int, int, int], size: tuple[int, int] = (320, 240),
                 fps: int = 15, clock: MediaClock | None = None, markers: bool = False) -> Any:
    """A video track of one solid colour (converted to YUV once: every frame is the same);
    with ``markers``, white for :data:`FLASH_S` at every :data:`MARKER_PERIOD_S`."""
    import av
    from aiortc import MediaStreamTrack

    def yuv(colour: tuple[int, int, int]) -> np.ndarray:
        picture = np.empty((size[1], size[0], 3), dtype=np.uint8)
        picture[:] = colour
        frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
        return frame.reformat(format="yuv420p").to_ndarray()

    class ColourTrack(MediaStreamTrack):
        kind = "video"

        def __init__(self) -> None:
            super().__init__()
            self._yuv = yuv(rgb)
            self._white = yuv((255, 255, 255)) if markers else self._yuv
            self.pace = _Paced(fps, clock)
            self.flashes = 0  # white frames sent

        async def recv(self) -> av.VideoFrame:
            n = await self.pace.next()
            white = markers and flash_frame(n, fps)
            self.flashes += white
            frame = av.VideoFrame.from_ndarray(self._white if white else self._yuv,
                                               format="yuv420p")
            frame.pts = n * 90000 // fps
            frame.time_base = Fraction(1, 90000)
            return frame

    return ColourTrack()


def tone_track(hz: float, amplitude: float = 0.3, rate: int = AUDIO_RATE,
               ptime: float = 0.02, clock: MediaClock | None = None,
               markers: bool = False) -> Any:
    """An audio track of one sine, phase-continuous across 20 ms frames; with ``markers``, at
    twice the frequency for :data:`FLASH_S` at every :data:`MARKER_PERIOD_S` (still
    phase-continuous: the phase advances twice as fast over those samples)."""
    import av
    from aiortc import MediaStreamTrack

    samples = int(rate * ptime)
    assert not markers or rate == AUDIO_RATE

    class ToneTrack(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self.pace = _Paced(Fraction(rate, samples), clock)

        async def recv(self) -> av.AudioFrame:
            n = await self.pace.next()
            s = n * samples + np.arange(samples, dtype=np.int64)
            if markers:
                s = s + doubled_before(s, rate)
            cycles = np.mod(hz * s / rate, 1.0)
            wave = (amplitude * 32767 * np.sin(2 * np.pi * cycles)).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(wave.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = rate
            frame.pts = n * samples
            frame.time_base = Fraction(1, rate)
            return frame

    return ToneTrack()


# --- publishers and the meeting ------------------------------------------------------------

#: aiortc's codec choices by Person.codec: MIME type, and the fmtp parameters preferred first.
VIDEO_CODECS = {"vp8": ("video/VP8", {}),
                "h264": ("video/H264", {"profile-level-id": "42e01f"})}


@dataclass(frozen=True)
class Person:
    """One publisher's media and schedule (seconds after the room is created)."""

    name: str
    pid: int
    rgb: tuple[int, int, int]
    tone: float
    join_at: float
    #: ``unpublish`` then (later) ``leave``; ``leave`` alone; or neither (present at destroy).
    unpublish_at: float | None = None
    leave_at: float | None = None
    #: video frames per second, picture size (width, height) and codec (``vp8`` or ``h264``)
    fps: int = 15
    size: tuple[int, int] = (320, 240)
    codec: str = "vp8"
    #: sync markers: white picture and doubled tone for 100 ms at every 5 s of the media clock
    markers: bool = False


#: Three participants: X stays until the room is destroyed, Y unpublishes then leaves, Z
#: leaves while publishing.
DEFAULT_PEOPLE = (
    Person("X", 101, (20, 160, 160), 350.0, 0.0),
    Person("Y", 102, (180, 40, 160), 500.0, 2.0, unpublish_at=7.0, leave_at=8.0),
    Person("Z", 103, (220, 200, 40), 750.0, 4.0, leave_at=10.0),
)
DEFAULT_DESTROY_AT = 12.0


@dataclass
class Sent:
    """What one publisher actually sent, by wall clock (seconds since the epoch)."""

    person: Person
    first_media: float = 0.0  # the first frame handed to the encoder, audio or video
    stopped: float = 0.0  # the request that ended its publishing (or the room's destroy)
    video_frames: int = 0  # frames handed to the encoders until ``stopped``
    audio_frames: int = 0
    #: the addresses of the ICE candidates in Janus's answer
    janus_candidates: list[str] = field(default_factory=list)
    #: the media clock's zero Z (wall clock; :attr:`first_media` is the same instant)
    clock_zero: float = 0.0
    #: the number of each track's first frame on that clock (one of them is 0)
    video_first: int = 0
    audio_first: int = 0
    #: white video frames sent until ``stopped``
    flash_frames: int = 0
    #: when the requests left: join, publish, unpublish and leave (``None``: not sent)
    joined: float = 0.0
    published: float = 0.0
    unpublished: float | None = None
    left: float | None = None
    #: when the PeerConnection reached "connected"
    connected: float = 0.0
    janus_session: int = 0
    janus_handle: int = 0
    #: the video codec's fmtp line in Janus's answer
    video_fmtp: str = ""


@dataclass
class MeetingLog:
    """The meeting as the publishers lived it: the truth to measure a rendering against."""

    room: int
    created: float
    destroyed: float = 0.0
    sent: list[Sent] = field(default_factory=list)

    @property
    def start(self) -> float:
        return min(s.first_media for s in self.sent)

    @property
    def length(self) -> float:
        """First media sent to the room's destroy: the meeting a rendering should show."""
        return max(s.stopped for s in self.sent) - self.start

    def span(self, name: str) -> tuple[float, float]:
        """A participant's publishing, in seconds of the meeting (from :attr:`start`)."""
        sent = next(s for s in self.sent if s.person.name == name)
        return sent.first_media - self.start, sent.stopped - self.start


async def _sleep_until(t0: float, at: float) -> None:
    await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))


async def _keepalive(session: JanusSession, period: float = 20.0) -> None:
    while True:
        await asyncio.sleep(period)
        with contextlib.suppress(OSError, JanusError):
            await session.keepalive()


def _answer_fmtp(sdp: str, kind: str) -> str:
    """The fmtp of the first payload type of the answer's ``m=<kind>`` section."""
    section = sdp.split(f"m={kind} ", 1)[-1].split("\nm=", 1)[0]
    lines = section.splitlines()
    payload = lines[0].split()[2] if lines and len(lines[0].split()) > 2 else ""
    for line in lines:
        if line.startswith(f"a=fmtp:{payload} "):
            return line.split(" ", 1)[1].strip()
    return ""


async def _publisher(url: str, room: int, person: Person, t0: float, sent: Sent,
                     destroyed: asyncio.Event) -> None:
    from aiortc import (
        RTCConfiguration,
        RTCPeerConnection,
        RTCRtpSender,
        RTCSessionDescription,
    )

    await _sleep_until(t0, person.join_at)
    session = JanusSession(url)
    await session.create()
    keepalive = asyncio.create_task(_keepalive(session))
    handle = await session.attach()
    sent.janus_session, sent.janus_handle = session.id, handle
    sent.joined = (await session.message(
        handle, {"request": "join", "ptype": "publisher", "room": room, "id": person.pid,
                 "display": person.name})).sent
    # No STUN server: aiortc would otherwise ask a public one for a reflexive candidate.
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    clock = MediaClock()  # both tracks' pts and pacing count from its zero
    video = colour_track(person.rgb, person.size, person.fps, clock, person.markers)
    audio = tone_track(person.tone, clock=clock, markers=person.markers)
    video_mime, preferred = VIDEO_CODECS[person.codec]
    # Audio first, as browsers do: Janus names the files ``audio-0`` and ``video-1``.
    for track, mime in ((audio, "audio/opus"), (video, video_mime)):
        transceiver = pc.addTransceiver(track, direction="sendonly")
        codecs = [c for c in RTCRtpSender.getCapabilities(track.kind).codecs
                  if c.mimeType == mime]
        if track is video:
            codecs.sort(key=lambda c: any(c.parameters.get(k) != v
                                          for k, v in preferred.items()))
        transceiver.setCodecPreferences(codecs)
    connected = asyncio.Event()

    @pc.on("connectionstatechange")
    def _state() -> None:
        if pc.connectionState == "connected":
            sent.connected = time.time()
            connected.set()

    def counts() -> None:
        sent.video_frames, sent.audio_frames = video.pace.count, audio.pace.count
        sent.flash_frames = video.flashes

    try:
        await pc.setLocalDescription(await pc.createOffer())  # gathers every candidate
        reply = await session.message(
            handle, {"request": "publish", "audiocodec": "opus", "videocodec": person.codec},
            jsep={"type": "offer", "sdp": pc.localDescription.sdp, "trickle": False})
        sent.published = reply.sent
        jsep = reply.jsep
        assert jsep is not None and jsep["type"] == "answer", jsep
        # a=candidate:<foundation> <component> <transport> <priority> <address> <port> typ …
        sent.janus_candidates = [line.split()[4] for line in jsep["sdp"].splitlines()
                                 if line.startswith("a=candidate:")]
        sent.video_fmtp = _answer_fmtp(jsep["sdp"], "video")
        await pc.setRemoteDescription(RTCSessionDescription(jsep["sdp"], "answer"))
        await asyncio.wait_for(connected.wait(), 15.0)

        # Publishing ends at the first of unpublish, leave and the room's destroy (whose time
        # run_meeting notes).
        for request, at in (("unpublish", person.unpublish_at), ("leave", person.leave_at)):
            if at is None:
                continue
            await _sleep_until(t0, at)
            stopping = not sent.stopped
            if stopping:
                counts()
            request_sent = (await session.message(handle, {"request": request})).sent
            if request == "unpublish":
                sent.unpublished = request_sent
            else:
                sent.left = request_sent
            if stopping:
                sent.stopped = request_sent
        if not sent.stopped:
            await destroyed.wait()
            counts()
    finally:
        sent.first_media = clock.zero_wall or time.time()
        sent.clock_zero = sent.first_media
        sent.video_first, sent.audio_first = video.pace.first or 0, audio.pace.first or 0
        await pc.close()
        keepalive.cancel()
        await session.destroy()


async def run_meeting(
    url: str, rec_dir: Path, people: tuple[Person, ...] = DEFAULT_PEOPLE,
    destroy_at: float = DEFAULT_DESTROY_AT, room: int | None = None,
    description: str = "melter end-to-end",
) -> MeetingLog:
    """Create a recorded room, run the publishers' schedule, destroy the room."""
    room = room or 2000 + secrets.randbelow(7000)
    admin = JanusSession(url)
    await admin.create()
    handle = await admin.attach()
    # The room takes every codec its publishers use (in the order they first appear).
    videocodecs = ",".join(dict.fromkeys(p.codec for p in people))
    await admin.message(handle, {"request": "create", "room": room, "publishers": 6,
                                 "record": True, "rec_dir": str(rec_dir),
                                 "audiocodec": "opus", "videocodec": videocodecs,
                                 "description": description})
    log = MeetingLog(room, time.time())
    t0 = time.monotonic()
    destroyed = asyncio.Event()
    log.sent = [Sent(p) for p in people]
    tasks = [asyncio.create_task(_publisher(url, room, s.person, t0, s, destroyed))
             for s in log.sent]
    try:
        await _sleep_until(t0, destroy_at)
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        log.destroyed = (await admin.message(handle, {"request": "destroy", "room": room})).sent
        for s in log.sent:
            if not s.stopped:
                s.stopped = log.destroyed
        destroyed.set()
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await admin.destroy()
    return log


# --- the event receiver --------------------------------------------------------------------


class EventReceiver:
    """Captures the sample event handler's POSTs (one JSON object, or an array of them)."""

    def __init__(self, host: str, port: int = 0, user: str | None = None,
                 password: str | None = None) -> None:
        self.events: list[dict] = []
        self.posts = 0
        self.refused = 0
        self.encodings: set[str] = set()
        expected = None
        if user is not None:
            expected = "Basic " + base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if expected is not None and self.headers.get("Authorization") != expected:
                    receiver.refused += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.encodings.add(self.headers.get("Content-Encoding", ""))
                if body[:1] not in (b"{", b"["):  # the handler's "compress = true"
                    body = zlib.decompress(body, wbits=47)
                got = json.loads(body)
                with receiver._lock:
                    receiver.posts += 1
                    receiver.events.extend(got if isinstance(got, list) else [got])
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self._server.server_address[1]}/janus/events"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> EventReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def videoroom(self, room: int) -> list[str]:
        """The VideoRoom events of ``room`` in arrival order (``joined``, ``published``…)."""
        return [e["event"]["data"].get("event", "") for e in self.events
                if e.get("type") == 64 and e["event"]["data"].get("room") == room]


def event_counts(events: list[dict]) -> dict[str, int]:
    """Events by type name, and VideoRoom events by their own name (``videoroom:joined``)."""
    names = {1: "session", 2: "handle", 4: "external", 8: "jsep", 16: "webrtc", 32: "media",
             64: "plugin", 128: "transport", 256: "core"}
    counts: dict[str, int] = {}
    for event in events:
        keys = [names.get(event.get("type", 0), str(event.get("type")))]
        if event.get("type") == 64:
            keys.append("videoroom:" + str(event["event"]["data"].get("event")))
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
    return counts


# --- melter serve and a farm worker -------------------------------------------------------


def melter_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment for Melter subprocesses: the same ``melter`` package as this process."""
    import melter

    env = dict(os.environ)
    package_root = str(Path(melter.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def serve_available() -> bool:
    """Whether this tree's ``melter`` has the ``serve`` command."""
    probe = subprocess.run([sys.executable, "-m", "melter.cli", "serve", "--help"],
                           capture_output=True, env=melter_env({}), timeout=60)
    return probe.returncode == 0


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    """``melter serve`` on the host's end of the veth pair, and one farm worker."""

    base: Path
    host: str
    port: int
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def events_url(self) -> str:
        return f"http://{self.host}:{self.port}/janus/events"

    @property
    def recordings(self) -> Path:
        return Path(self.env["MELTER_RECORDINGS_DIR"])

    @property
    def renders(self) -> Path:
        return Path(self.env["MELTER_RENDERS_DIR"])

    def log(self, name: str, lines: int = 60) -> str:
        path = self.base / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self, name: str, args: list[str]) -> None:
        with (self.base / f"{name}.log").open("wb") as log:
            # Each in its own process group: stopping it stops its pool and melt too.
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", *args], env=self.env, cwd=self.base, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited ({process.returncode}):\n{self.log(name)}")
            with contextlib.suppress(OSError), socket.create_connection(
                    (self.host, self.port), timeout=0.5):
                return
            time.sleep(0.1)
        raise RuntimeError(f"melter serve is not listening after {timeout} s:\n"
                           + self.log("serve"))

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)

    def rendered(self) -> list[Path]:
        """Finished videos under the renders folder (a render is linked there when whole)."""
        if not self.renders.exists():
            return []
        return sorted(p for p in self.renders.rglob("*.mp4")
                      if ".melter-tmp" not in p.parts and ".melter-parts" not in p.parts)


@contextlib.contextmanager
def melter_service(base: Path, host: str, redis_url: str, janus_user: str,
                   janus_password: str, grace_seconds: float = 2.0, workers: int = 1,
                   settings: dict[str, str] | None = None) -> Iterator[Service]:
    """``melter serve`` and ``workers`` farm workers on a private Redis namespace; all removed
    afterwards. ``settings``: more environment (``MELTER_*``) for all of them."""
    import redis

    tag = secrets.token_hex(4)
    storage = base / "storage"
    (storage / "recordings").mkdir(parents=True)
    (storage / "renders").mkdir()
    (base / "farm.toml").write_text("")  # not the machine's /etc/melter/farm.toml
    prefixes = {"MELTER_KEY_PREFIX": f"melter-e2e-{tag}",
                "MELTER_QUEUE_PREFIX": f"e2e-{tag}-",
                "MELTER_BROKER_KEY_PREFIX": f"e2e-{tag}:"}
    env = melter_env({
        "MELTER_CONFIG": str(base / "farm.toml"),
        "MELTER_BROKER_URL": redis_url,
        **prefixes,
        "MELTER_STORAGE_ROOT": str(storage),
        "MELTER_RECORDINGS_DIR": str(storage / "recordings"),
        "MELTER_RENDERS_DIR": str(storage / "renders"),
        "MELTER_GRACE_SECONDS": str(grace_seconds),
        "MELTER_TICK_SECONDS": "0.5",
        "MELTER_JANUS_USER": janus_user,
        "MELTER_JANUS_PASSWORD": janus_password,
        "MELTER_DEFAULT_LAYOUT": "grid",
        **(settings or {}),
    })
    service = Service(base, host, _free_port(host), env)
    try:
        for number in range(workers):
            service.start("worker" if number == 0 else f"worker{number + 1}",
                          ["melter.farm", "worker", "-c", "1", "-n", f"w{number + 1}@%h"])
        service.start("serve", ["melter.cli", "serve", "--host", host,
                                "--port", str(service.port)])
        service.wait_listening()
        yield service
    finally:
        service.stop()
        client = redis.Redis.from_url(redis_url)
        for prefix in prefixes.values():
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            if keys:
                client.delete(*keys)


# --- measuring a rendering -----------------------------------------------------------------


@dataclass
class Measured:
    """A rendered meeting, as numbers: length, tile colours and tone levels per participant."""

    frames: int
    fps: float
    audio_s: float
    #: name -> [(output seconds, mean RGB at the centre of the participant's tile)]
    tiles: dict[str, list[tuple[float, tuple[float, float, float]]]]
    #: name -> [(output seconds, {participant id: tile colour})] half a second before joining
    #: and after leaving
    absent: dict[str, list[tuple[float, dict[str, tuple[float, float, float]]]]]
    #: name -> (median level of its tone while publishing, loudest level well outside that)
    tone_levels: dict[str, tuple[float, float]]
    #: the strongest frequencies of the whole mix, strongest first (Hz)
    peaks: list[float]

    @property
    def video_s(self) -> float:
        return self.frames / self.fps


def _spectrum_peaks(samples: np.ndarray, rate: int, count: int) -> list[float]:
    """The ``count`` strongest spectral peaks, at least 50 Hz apart."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    freqs = np.fft.rfftfreq(len(samples), 1 / rate)
    peaks: list[float] = []
    for index in np.argsort(spectrum)[::-1]:
        f = float(freqs[index])
        if f > 20 and all(abs(f - p) >= 50 for p in peaks):
            peaks.append(f)
            if len(peaks) == count:
                break
    return peaks


def measure(path: Path, rec_dir: Path, log: MeetingLog, layout: str = "grid") -> Measured:
    """Measure a rendering of ``log``'s meeting; melter's plan only says where each tile is."""
    import av

    from melter.compose import plan_meeting
    from melter.layout.model import load_layout
    from melter.meeting import discover
    from tests.helpers.mediacheck import decode_audio, tone_envelope

    plan, _ = plan_meeting(discover([rec_dir], room=str(log.room)), load_layout(layout))
    fps = float(plan.fps)

    def cells(t: float) -> dict[str, tuple[int, int]]:
        """Tile centres by participant in the output frame starting at ``t``."""
        at = (t + 0.5 / fps) * 1e6  # the frame's middle: scene bounds lie on frame starts
        for scene in plan.scenes:
            if scene.start_us <= at < scene.end_us:
                return {pl.participant: (pl.rect.x + pl.rect.width // 2,
                                         pl.rect.y + pl.rect.height // 2)
                        for pl in scene.placements}
        return {}

    # Inside each publishing span, and half a second either side of it within the meeting.
    wanted: dict[int, list[tuple[str, bool]]] = {}
    for sent in log.sent:
        a, b = log.span(sent.person.name)
        for t in (a + 0.5, (a + b) / 2, b - 0.5):
            wanted.setdefault(round(t * fps), []).append((sent.person.name, True))
        for t in (a - 0.5, b + 0.5):
            if 0.1 < t < log.length - 0.1:
                wanted.setdefault(round(t * fps), []).append((sent.person.name, False))
    pids = {s.person.name: str(s.person.pid) for s in log.sent}
    tiles: dict[str, list[tuple[float, tuple[float, float, float]]]] = {n: [] for n in pids}
    absent: dict[str, list[tuple[float, dict[str, tuple[float, float, float]]]]] = {
        n: [] for n in pids}
    frames = 0
    with av.open(str(path)) as container:
        for frame in container.decode(container.streams.video[0]):
            frames += 1
            if frame.pts is None or frame.time_base is None:
                continue
            number = round(float(frame.pts * frame.time_base) * fps)
            if number not in wanted:
                continue
            t = number / fps
            picture = frame.to_ndarray(format="rgb24")
            shown: dict[str, tuple[float, float, float]] = {}
            for pid, (x, y) in cells(t).items():
                mean = picture[y - 8 : y + 8, x - 8 : x + 8].reshape(-1, 3).mean(axis=0)
                shown[pid] = (float(mean[0]), float(mean[1]), float(mean[2]))
            for name, present in wanted[number]:
                if present:
                    tiles[name].append((t, shown.get(pids[name], (-1.0, -1.0, -1.0))))
                else:
                    absent[name].append((t, shown))

    audio = decode_audio(path)
    edges = [e for s in log.sent for e in log.span(s.person.name)]
    levels: dict[str, tuple[float, float]] = {}
    for sent in log.sent:
        a, b = log.span(sent.person.name)
        times, amplitude = tone_envelope(audio, sent.person.tone, window=0.08, hop=0.02)
        inside = (times > a + 0.3) & (times < b - 0.3)
        outside = (times < a - 0.3) | (times > b + 0.3)
        for edge in edges:  # a tone starting or stopping clicks over every frequency
            outside &= np.abs(times - edge) > 0.15
        outside &= times < audio.start + audio.duration - 0.15
        levels[sent.person.name] = (
            float(np.median(amplitude[inside])) if inside.any() else 0.0,
            float(amplitude[outside].max()) if outside.any() else 0.0,
        )
    peaks = _spectrum_peaks(audio.samples.astype(np.float64), audio.rate, len(log.sent))
    return Measured(frames, fps, audio.duration, tiles, absent, levels, peaks)


def summary(m: Measured, log: MeetingLog) -> str:
    """The measurements next to what was sent, one line each: for the test's output."""
    lines = [f"meeting {log.length:.3f} s (first media to destroy); video {m.frames} frames = "
             f"{m.video_s:.3f} s at {m.fps:g} fps; audio {m.audio_s:.3f} s"]
    for sent in log.sent:
        p = sent.person
        a, b = log.span(p.name)
        tiles = ", ".join(f"{t:.2f} s ({r:.0f},{g:.0f},{bl:.0f})"
                          for t, (r, g, bl) in m.tiles[p.name])
        inside, outside = m.tone_levels[p.name]
        away = ", ".join(f"{t:.2f} s ({len(shown)} tiles)" for t, shown in m.absent[p.name])
        lines.append(f"{p.name}: {a:.2f}-{b:.2f} s, sent {p.rgb} and {p.tone:g} Hz "
                     f"({sent.video_frames} video, {sent.audio_frames} audio frames); "
                     f"tile {tiles}; not shown at {away or '-'}; "
                     f"tone {inside:.3f} inside, {outside:.4f} outside")
    lines.append("spectral peaks: " + ", ".join(f"{f:.1f} Hz" for f in m.peaks))
    return "\n".join(lines)
