"""Time to video: how long after a meeting ends its video is on storage, through a real
``melter serve``, real farm workers and a real Redis, with the meeting played live by
``melter replay``.

    python -m bench.time_to_video                           # every fixture with events, speed 1
    python -m bench.time_to_video --meetings janus-10fps-vp8 --speed 2
    python -m bench.time_to_video --long 10 --meetings janus-mixed-fps-vp8   # a 10-minute one

It starts ``melter serve`` (Janus credentials set, its own Redis database and key prefix, a
storage root in a temporary folder; the service's own settle time and default layout unless
``--settle`` or ``--layout`` say otherwise) and ``--workers`` farm workers, as ``bench/soak.py``
does. Then, one meeting after the other, it runs ``melter replay MEETING --into RECORDINGS
--events URL --room ROOM --speed X`` as a child process: the meeting's MJR files grow in the
service's recordings folder at the pace their packets arrived, and its Janus events are posted
when Janus sent them, under a new room number. The events go through a recording relay in this
process, which forwards each POST to the service's ``/janus/events`` and notes when the service
answered the POST that holds the room's ``destroyed``. From that moment it follows the job the
service submits for the room (``GET /jobs?room=``, every 0.2 s) and watches the renders folder
(every 20 ms) for the job's output. The next meeting starts once the job ended, so each one
finds the farm idle.

Per meeting it prints the meeting's span (first packet to the end of the last), how late the
replay ran against the meeting's own clock (the replay's own "latest step" figure, its wall time
against the meeting's length, and when the ``destroyed`` POST was answered against when Janus
sent it), the times from the ``destroyed`` POST to the job's submission, its start on a worker,
the output file's appearance and the job's end, the render time (the job's ``running_s``), and
the output's duration (PyAV) against the span. At the end a table and the median and maximum
``destroyed`` -> file time. Exit status 0 when every meeting's video appeared with a duration
within 0.1 s of its span, 1 otherwise.

``--long MINUTES`` replays, instead of each chosen fixture, a meeting of about that length made
of the fixture's recordings played several times end to end: repetition *k* of every file moves
its arrival times by *k* cycles (the meeting's packet span and 100 ms), its RTP timestamps by
the same time on the file's clock and its sequence numbers by *k* times the file's sequence
span, so each participant pauses between repetitions and no clock skew is added; the Janus
events are the fixture's, those from the room's ``destroyed`` on moved to the end.

Needs Redis, ``melt``, ``ffmpeg`` and PyAV. Everything it made (processes, Redis keys, the
folder) is removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bench import soak
from melter.mjr.reader import MjrReader, Variant

TERMINAL = ("done", "failed", "cancelled")
#: Between one repetition of a recording and the next, in --long meetings.
CYCLE_GAP_MS = 100
CLOCK_RATES = {"opus": 48000, "g711": 8000, "pcmu": 8000, "pcma": 8000, "g722": 8000}


def fixtures_with_events() -> list[str]:
    """The fixtures with Janus events, in soak's order (shortest first), then any others."""
    found = sorted(p.parent.name for p in soak.FIXTURES.glob("*/events.jsonl"))
    return [m for m in soak.MEETINGS if m in found] + [m for m in found
                                                       if m not in soak.MEETINGS]


# -- a long meeting from a fixture's recordings -------------------------------------------------
def build_long_meeting(fixture: str, minutes: float, target: Path) -> tuple[float, int]:
    """Write a meeting of about ``minutes`` into ``target`` (see the module's docstring); its
    span in seconds and the number of repetitions."""
    source = soak.FIXTURES / fixture
    span = soak.meeting_span(fixture)
    cycle_ms = math.ceil(span * 1000) + CYCLE_GAP_MS
    reps = max(1, math.ceil(minutes * 60_000 / cycle_ms))
    target.mkdir(parents=True)
    for path in sorted(source.glob("*.mjr")):
        reader = MjrReader(path)
        if reader.header.variant is not Variant.V2:
            raise SystemExit(f"time_to_video: {path.name} is not MJR00002 (no arrival times)")
        rate = 90000 if reader.header.kind == "video" else CLOCK_RATES.get(
            reader.header.codec, 48000)
        frames = [(f.arrival_ms or 0, f.data) for f in reader.frames() if len(f.data) >= 12]
        seqs = [int.from_bytes(d[2:4], "big") for _, d in frames]
        seq_step = ((seqs[-1] - seqs[0]) % 65536 + 1) if seqs else 0
        with path.open("rb") as handle:
            header = handle.read(reader.header.frames_offset)
        with (target / path.name).open("wb") as out:
            out.write(header)
            for k in range(reps):
                shift_ms = k * cycle_ms
                shift_ts = shift_ms * rate // 1000
                for arrival, data in frames:
                    seq = (int.from_bytes(data[2:4], "big") + k * seq_step) & 0xFFFF
                    ts = (int.from_bytes(data[4:8], "big") + shift_ts) & 0xFFFF_FFFF
                    rtp = data[:2] + seq.to_bytes(2, "big") + ts.to_bytes(4, "big") + data[8:]
                    out.write(b"MEET" + ((arrival + shift_ms) & 0xFFFF_FFFF).to_bytes(4, "big")
                              + len(rtp).to_bytes(2, "big") + rtp)
    lines = [json.loads(x) for x in (source / "events.jsonl").read_text().splitlines()
             if x.strip()]
    destroyed = min(int(e["timestamp"]) for e in lines if is_destroyed(e))
    moved = (reps - 1) * cycle_ms * 1000
    for event in lines:
        if int(event["timestamp"]) >= destroyed:
            event["timestamp"] = int(event["timestamp"]) + moved
    (target / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    return span + (reps - 1) * cycle_ms / 1000, reps


def is_destroyed(event: Any) -> bool:
    if not isinstance(event, dict) or event.get("type") != 64:
        return False
    data = (event.get("event") or {}).get("data")
    return isinstance(data, dict) and data.get("event") == "destroyed"


# -- the relay between the replay and the service -----------------------------------------------
class Relay:
    """Forwards ``POST /janus/events`` to the service and notes, per room, when the POST holding
    its ``destroyed`` was answered, and when each POST was answered with its events' times."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.lock = threading.Lock()
        self.destroyed: dict[str, float] = {}  # room -> Unix time the service answered
        self.destroyed_ts: dict[str, int] = {}  # room -> the event's timestamp (µs)
        self.posts: dict[str, list[tuple[float, int, str]]] = {}  # room -> (answered, ts, status)
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() in ("content-type", "authorization", "content-encoding")}
                request = urllib.request.Request(relay.target, body, headers, method="POST")
                try:
                    with urllib.request.urlopen(request, timeout=30) as reply:
                        status, content = reply.status, reply.read()
                except urllib.error.HTTPError as exc:
                    status, content = exc.code, exc.read()
                except OSError as exc:
                    status, content = 502, str(exc).encode()
                answered = time.time()
                relay.note(body, status, answered)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/janus/events"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def note(self, body: bytes, status: int, answered: float) -> None:
        try:
            parsed = json.loads(body)
        except ValueError:
            return
        events = parsed if isinstance(parsed, list) else [parsed]
        with self.lock:
            for event in events:
                if not isinstance(event, dict) or event.get("type") != 64:
                    continue
                data = (event.get("event") or {}).get("data") or {}
                room = str(data.get("room"))
                self.posts.setdefault(room, []).append(
                    (answered, int(event.get("timestamp") or 0), str(status)))
                if is_destroyed(event) and status == 200 and room not in self.destroyed:
                    self.destroyed[room] = answered
                    self.destroyed_ts[room] = int(event["timestamp"])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the renders folder -------------------------------------------------------------------------
class Watcher:
    """Polls the renders folder every ``every`` seconds; when each file was first seen."""

    def __init__(self, folder: Path, every: float = 0.02) -> None:
        self.folder = folder
        self.every = every
        self.seen: dict[str, float] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping.is_set():
            now = time.time()
            for top, dirs, files in os.walk(self.folder):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for name in files:
                    self.seen.setdefault(os.path.join(top, name), now)
            self.stopping.wait(self.every)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=2)


class LiveWatch:
    """Polls the renders folder's playlists every ``every`` seconds while a meeting goes on:
    how much of the meeting each one held when (an EVENT playlist grows as chunks finish),
    when it first became a VOD playlist, and what FFmpeg made of it halfway through."""

    def __init__(self, folder: Path, every: float = 0.1) -> None:
        self.folder = folder
        self.every = every
        self.started = time.time()
        self.steps: list[tuple[float, float]] = []  # (wall clock, seconds of meeting listed)
        self.vod_at: float | None = None
        self.during: str | None = None  # FFmpeg's verdict on the live playlist
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        checker: threading.Thread | None = None
        while not self.stopping.is_set():
            for playlist in self.folder.glob("*.m3u8"):
                try:
                    text = playlist.read_text()
                except OSError:
                    continue
                now = time.time()
                if "#EXT-X-ENDLIST" in text:
                    self.vod_at = self.vod_at or now
                    continue
                listed = sum(float(line[8:].split(",")[0]) for line in text.splitlines()
                             if line.startswith("#EXTINF:"))
                if not self.steps or listed != self.steps[-1][1]:
                    self.steps.append((now, listed))
                if checker is None and listed >= 30:
                    checker = threading.Thread(target=self.check, args=(playlist,), daemon=True)
                    checker.start()
            self.stopping.wait(self.every)

    def check(self, playlist: Path) -> None:
        self.during = ffmpeg_reads(playlist, live=True)

    def lag(self, until: float) -> float:
        """The most the playlist was behind the meeting until ``until`` (wall clock): just
        before each step, and at the end."""
        worst, listed = 0.0, 0.0
        for at, seconds_listed in [*self.steps, (until, -1.0)]:
            worst = max(worst, (min(at, until) - self.started) - listed)
            listed = seconds_listed
        return worst

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=2)


def ffmpeg_reads(playlist: Path, live: bool = False) -> str:
    """What FFmpeg says reading a playlist (a live one from its first segment, until it has
    found nothing new twice): "ok, N frames" or its messages."""
    options = ["-live_start_index", "0", "-m3u8_hold_counters", "2"] if live else []
    try:
        done = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", *options, "-i",
                               str(playlist), "-f", "framecrc", "-"], capture_output=True,
                              text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "timed out"
    frames = sum(1 for line in done.stdout.splitlines() if line.startswith("0,"))
    if done.returncode != 0 or done.stderr:
        return f"exit {done.returncode}: {done.stderr.strip()[-300:]}"
    return f"ok, {frames} frames"


# -- against a render after the meeting ------------------------------------------------------
def _pictures(path: Path) -> np.ndarray:
    """Mean of the luma and of the chroma of every frame."""
    import av

    means = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            plane = frame.to_ndarray(format="yuv420p")
            means.append((plane[:frame.height].mean(), plane[frame.height:].mean()))
    return np.array(means)


def _sound(path: Path) -> np.ndarray:
    """Decoded samples as floats, shaped (channels, samples)."""
    import av

    with av.open(str(path)) as container:
        channels = container.streams.audio[0].codec_context.channels
        chunks = [f.to_ndarray() for f in container.decode(audio=0)]
    data = np.concatenate(chunks, axis=1)
    if data.dtype == np.int16:  # packed 16-bit PCM (WAV): one row of interleaved samples
        return data.reshape(-1, channels).T / 32768
    return data


def _encoded_once(mix: Path, like: Path) -> Path:
    """The mix encoded by FFmpeg in one run, with ``like``'s audio codec and bit rate (beside
    the mix, reused)."""
    import av

    with av.open(str(like)) as container:
        context = container.streams.audio[0].codec_context
        codec, rate = context.name, context.bit_rate or 128_000
    # MP4 for AAC (its edit list hides the encoder's priming, as in the outputs compared).
    target = mix.with_name(f"{mix.stem}.once-{codec}-{rate}"
                           + (".mp4" if codec == "aac" else ".mka"))
    if not target.exists():
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(mix),
                        "-c:a", {"opus": "libopus"}.get(codec, codec), "-b:a", str(rate),
                        str(target)], check=True)
    return target


def _per_second(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RMS of ``a - b`` in each whole second."""
    second = 48_000
    count = min(a.shape[1], b.shape[1]) // second
    return np.sqrt(np.mean(((a[:, :count * second] - b[:, :count * second])
                            .reshape(a.shape[0], count, second)) ** 2, axis=(0, 2)))


def compare(result_path: Path, reference: Path,
            mix: Path | None = None) -> tuple[dict[str, Any], bool]:
    """A render against a single pass of the same recordings: frames, pictures (per-frame
    means within 3 of 255), sound: as many samples, aligned (the difference at least twice
    as large moved by one sample either way: none lost or repeated), and no click or gap
    anywhere (no one-second window differs more than 4 times the median window; a seam
    where chunks join shows as such a window).

    With ``mix`` (the single pass's mix as 16-bit PCM, ``melter render -o mix.wav``), each
    second is measured against the mix itself instead: two AAC encodes of one mix differ by
    the codec's noise, which on pure tones swings by far more than 4 times from one second to
    another (on two CPUs the single pass's AAC was at -60 dB in one stretch, -26 dB in the
    next), while a seam shows in one encode only. A second fails then when the result's
    difference with the mix is above 4 times its median and twice what one encoder does there:
    the single pass's own, or FFmpeg's encoding of the whole mix in one run, whichever is
    further (at a sound's end a single run's packet can lie at -14 dB from the mix)."""
    got, ref = _pictures(result_path), _pictures(reference)
    facts: dict[str, Any] = {"frames": len(got), "frames_posthoc": len(ref)}
    ok = len(got) == len(ref)
    if ok:
        per_frame = np.abs(got - ref).max(axis=1)
        facts["picture_max_diff"] = round(float(per_frame.max()), 3)
        ok = facts["picture_max_diff"] < 3.0
        if not ok:  # where: the frames that differ (a chunk's border, a repeated picture...)
            facts["frames_differing"] = [int(n) for n in np.nonzero(per_frame >= 3.0)[0][:20]]
    heard, whole = _sound(result_path), _sound(reference)
    if result_path.suffix == ".m3u8":
        heard = heard[:, 1024:]  # MPEG-TS has no edit list to hide the encoder's priming
    facts["samples"], facts["samples_posthoc"] = heard.shape[1], whole.shape[1]
    ok = ok and heard.shape == whole.shape
    if heard.shape == whole.shape:
        a, b = heard[:, 2048:-2048], whole[:, 2048:-2048]
        rms = float(np.sqrt(np.mean((a - b) ** 2)))
        moved = min(float(np.sqrt(np.mean((a[:, 1:] - b[:, :-1]) ** 2))),
                    float(np.sqrt(np.mean((a[:, :-1] - b[:, 1:]) ** 2))))
        signal = float(np.sqrt(np.mean(b ** 2)))
        facts.update(audio_snr_db=round(20 * math.log10(signal / rms), 1) if rms else None,
                     audio_rms=round(rms, 6), audio_rms_moved_1=round(moved, 6))
        ok = ok and moved >= 2 * rms
        if mix is None:
            windows = _per_second(a, b)
            median = float(np.median(windows)) or 1e-12
            worst = int(np.argmax(windows))
            facts["worst_second"] = (f"{worst + 2048 / 48_000:.0f} s: "
                                     f"{float(windows[worst]) / median:.2f} x the median")
            ok = ok and float(windows[worst]) <= 4 * median
        else:
            exact = _sound(mix)[:, 2048:]
            once = _sound(_encoded_once(mix, result_path))[:, 2048:]
            ours, theirs = _per_second(a, exact), _per_second(b, exact)
            alone = _per_second(once, exact)
            count = min(len(ours), len(theirs), len(alone))
            # What one encoder does to each second: the single pass's, or FFmpeg's own run
            # over the whole mix, whichever lies further (each has seconds the other has not:
            # melt's at -26 dB where FFmpeg's is at -60, FFmpeg's on a sound's end).
            ours, theirs = ours[:count], np.maximum(theirs[:count], alone[:count])
            median = float(np.median(ours)) or 1e-12
            limit = np.maximum(4 * median, 2 * theirs)
            failing = np.nonzero(ours > limit)[0]
            worst = int(np.argmax(ours / limit))
            def db(x: np.ndarray) -> float:
                n = min(x.shape[1], exact.shape[1])
                error = float(np.sqrt(np.mean((x[:, :n] - exact[:, :n]) ** 2)))
                return round(20 * math.log10(signal / error), 1)

            facts.update(
                against_mix_db=db(a), posthoc_against_mix_db=db(b),
                encoded_once_against_mix_db=db(once),
                worst_second=f"{worst + 2048 / 48_000:.0f} s: {float(ours[worst]):.5f} "
                             f"against the mix ({float(ours[worst]) / median:.2f} x the median, "
                             f"one encoder {float(theirs[worst]):.5f})",
                seconds_failing=[int(n) for n in failing[:20]])
            ok = ok and not failing.size
    return facts, ok


# -- one meeting --------------------------------------------------------------------------------
@dataclass
class Result:
    meeting: str
    room: str
    span: float
    replay_wall: float | None = None
    replay_length: float | None = None
    replay_late_ms: float | None = None
    destroyed_late_ms: float | None = None  # the destroyed POST against Janus's schedule
    to_submitted: float | None = None
    to_started: float | None = None
    to_file: float | None = None
    to_done: float | None = None
    render_s: float | None = None
    state: str = "no job"
    duration: float | None = None
    problem: str | None = None
    prerenders: int = 0  # prerender jobs while the meeting went on
    kept: str = ""  # video chunks kept from them, of all
    live: str = ""  # --hls: how the live playlist went
    compared: str = ""  # --compare: against a render after the meeting

    @property
    def ok(self) -> bool:
        return self.problem is None


def stamp(value: str | None) -> float | None:
    return dt.datetime.fromisoformat(value).timestamp() if value else None


def seconds(value: float | None, digits: int = 2) -> str:
    return "?" if value is None else f"{value:.{digits}f}"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.farm = soak.Soak(argparse.Namespace(
            snapshot=args.snapshot, redis=args.redis, grace=60.0, max_rooms=20000,
            idle_room_ttl=600.0, workers=args.workers, keep=args.keep, minutes=0.0))
        farm = self.farm
        farm.prefix = f"mttv-{secrets.token_hex(4)}"
        farm.env.update({"MELTER_KEY_PREFIX": farm.prefix,
                         "MELTER_QUEUE_PREFIX": f"{farm.prefix}-",
                         "MELTER_BROKER_KEY_PREFIX": f"{farm.prefix}:"})
        for name in ("MELTER_SETTLE_SECONDS", "MELTER_DEFAULT_LAYOUT", "MELTER_GRACE_SECONDS"):
            farm.env.pop(name, None)
        if args.settle is not None:
            farm.env["MELTER_SETTLE_SECONDS"] = str(args.settle)
        farm.env["MELTER_PRERENDER_SECONDS"] = str(args.prerender)
        if args.hls:
            config = farm.base / "melter.toml"
            config.write_text('[service.default]\n'
                              'outputs = [{ name = "room-{room}-{start}.m3u8" }]\n')
            farm.env["MELTER_CONFIG"] = str(config)
        if args.layout == "small":
            farm.env["MELTER_DEFAULT_LAYOUT"] = str(farm.storage / "layouts" / "small.yaml")
        elif args.layout:
            farm.env["MELTER_DEFAULT_LAYOUT"] = args.layout
        self.relay: Relay | None = None
        self.watcher: Watcher | None = None
        self.results: list[Result] = []

    def api(self, path: str) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.farm.port}{path}",
                                         headers={"Authorization": f"Bearer {self.farm.token}"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())

    def start(self) -> None:
        self.farm.start()
        self.relay = Relay(f"http://127.0.0.1:{self.farm.port}/janus/events")
        self.farm.renders.mkdir(parents=True, exist_ok=True)
        self.watcher = Watcher(self.farm.renders)

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        if self.relay is not None:
            self.relay.close()
        self.farm.cleanup()

    def run_meeting(self, index: int, fixture: str) -> Result:
        assert self.relay is not None and self.watcher is not None
        args = self.args
        room = str(8_100_000 + index)
        folder = soak.FIXTURES / fixture
        span = soak.meeting_span(fixture)
        name = fixture
        if args.long:
            folder = self.farm.base / "long" / f"{fixture}-{index}"
            span, reps = build_long_meeting(fixture, args.long, folder)
            name = f"{fixture} x{reps}"
        result = Result(name, room, span)
        log = self.farm.base / f"replay-{room}.log"
        live = LiveWatch(self.farm.renders) if args.hls else None
        command = [sys.executable, "-c", soak.CLI, "replay", str(folder), "--into",
                   str(self.farm.recordings), "--events", self.relay.url, "--room", room,
                   "--speed", str(args.speed)]
        with log.open("w") as out:
            child = subprocess.Popen(command, env={**self.farm.env, "COLUMNS": "400"},
                                     cwd=self.farm.base, stdout=out, stderr=subprocess.STDOUT)
            try:
                code = child.wait(timeout=span / args.speed + 300)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                code = -1
        try:
            return self._after_replay(result, code, log, live)
        finally:
            if live is not None:
                live.close()

    def _after_replay(self, result: Result, code: int, log: Path,
                      live: LiveWatch | None) -> Result:
        args, room, span = self.args, result.room, result.span
        assert self.relay is not None and self.watcher is not None
        text = " ".join(log.read_text(errors="replace").split())
        if (m := re.search(r"events over ([\d.]+) s", text)):
            result.replay_length = float(m[1]) / args.speed
        if (m := re.search(r"in ([\d.]+) s; latest step (\d+) ms late", text)):
            result.replay_wall, result.replay_late_ms = float(m[1]), float(m[2])
        if code != 0:
            result.problem = f"replay exited {code}: {text[-300:]}"
            return result
        destroyed = self.relay.destroyed.get(room)
        if destroyed is None:
            result.problem = "no destroyed event answered 200"
            return result
        posts = self.relay.posts.get(room, [])
        if posts:
            first_answered, first_ts, _ = posts[0]
            due = first_answered + (self.relay.destroyed_ts[room] - first_ts) / 1e6 / args.speed
            result.destroyed_late_ms = (destroyed - due) * 1000
        deadline = time.monotonic() + args.render_timeout
        job: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            try:
                jobs = self.api(f"/jobs?room={room}&prerender=true")
            except (OSError, ValueError):
                jobs = []
            prerenders = [j for j in jobs if (j.get("spec") or {}).get("prerender")]
            jobs = [j for j in jobs if not (j.get("spec") or {}).get("prerender")]
            if jobs and jobs[0]["state"] in TERMINAL:
                job = jobs[0]
                result.prerenders = len(prerenders)
                break
            time.sleep(0.2)
        if job is None:
            result.problem = f"no finished job {args.render_timeout:g} s after destroyed"
            return result
        timings = job.get("timings") or {}
        result.state = job["state"]
        submitted, started, finished = (stamp(timings.get(k))
                                        for k in ("submitted", "started", "finished"))
        result.to_submitted = submitted - destroyed if submitted else None
        result.to_started = started - destroyed if started else None
        result.to_done = finished - destroyed if finished else None
        result.render_s = timings.get("running_s")
        if job["state"] != "done":
            result.problem = f"job {job['id']} {job['state']}: {str(job.get('error'))[:200]}"
            return result
        output = Path(job["outputs"][0])
        until = time.monotonic() + 5
        while str(output) not in self.watcher.seen and time.monotonic() < until:
            time.sleep(0.05)
        seen = self.watcher.seen.get(str(output))
        if live is not None:
            while live.vod_at is None and time.monotonic() < until:
                time.sleep(0.05)
            seen = live.vod_at  # the live playlist was there long before
        if seen is None or not output.is_file():
            result.problem = f"no output at {output}"
            return result
        result.to_file = seen - destroyed
        if live is not None:
            self._live_summary(result, live, output, destroyed)
        try:
            manifest = json.loads(Path(f"{output}.manifest.json").read_text())
            chunks = manifest["timings"].get("chunks") or []
            result.kept = (f"{sum(1 for c in chunks if c.get('kept'))}/{len(chunks)}"
                           if chunks else "one piece")
        except (OSError, ValueError, KeyError):
            result.kept = "?"
        result.duration = soak.media_duration(output)
        if abs(result.duration - span) > soak.DURATION_TOLERANCE:
            result.problem = f"output {result.duration:.3f} s, meeting {span:.3f} s"
        if args.compare:
            self._compare(result, job, output)
        return result

    def _live_summary(self, result: Result, live: LiveWatch, output: Path,
                      destroyed: float) -> None:
        first = next((at - live.started for at, listed in live.steps if listed > 0), None)
        listed = [line for line in output.read_text().splitlines()
                  if line.startswith("#EXTINF:")]
        total = sum(float(line[8:].split(",")[0]) for line in listed)
        after = ffmpeg_reads(output)
        result.live = (f"first segment {seconds(first, 1)} s into the meeting, "
                       f"{len(live.steps)} updates, at most {live.lag(destroyed):.1f} s behind "
                       f"the meeting; FFmpeg during: {live.during or 'not run'}; VOD "
                       f"{len(listed)} segments, {total:.3f} s, FFmpeg after: {after}")
        if not (live.during or "").startswith("ok") or not after.startswith("ok") \
                or abs(total - result.span) > soak.DURATION_TOLERANCE:
            result.problem = f"live playlist: {result.live}"

    def _compare(self, result: Result, job: dict[str, Any], output: Path) -> None:
        spec = job.get("spec") or {}
        layout = self.farm.env.get("MELTER_DEFAULT_LAYOUT", "grid")
        reference = self.farm.base / f"posthoc-{result.room}.mp4"
        command = [sys.executable, "-c", soak.CLI, "render", *spec["inputs"], "-o",
                   str(reference), "--layout", layout]
        if spec.get("room"):
            command += ["--room", str(spec["room"])]
        began = time.monotonic()
        done = subprocess.run(command, env={**self.farm.env, "COLUMNS": "200"},
                              capture_output=True, text=True)
        took = time.monotonic() - began
        if done.returncode != 0:
            result.problem = f"post-hoc render failed: {done.stderr.strip()[-300:]}"
            return
        # The mix itself, lossless: what both AAC encodes are measured against, per second.
        mix = reference.with_suffix(".wav")
        command[command.index(str(reference))] = str(mix)
        done = subprocess.run(command, env={**self.farm.env, "COLUMNS": "200"},
                              capture_output=True, text=True)
        if done.returncode != 0:
            result.problem = f"post-hoc mix failed: {done.stderr.strip()[-300:]}"
            return
        facts, ok = compare(output, reference, mix)
        result.compared = f"post-hoc single pass {took:.1f} s; " + ", ".join(
            f"{k} {v}" for k, v in facts.items())
        if not ok:
            result.problem = f"differs from the post-hoc render: {result.compared}"
        reference.unlink()
        for made in (mix, *mix.parent.glob(f"{mix.stem}.once-*")):
            made.unlink()

    def line(self, r: Result) -> str:
        late = (f"replay {seconds(r.replay_wall, 1)} s for {seconds(r.replay_length, 1)} s of "
                f"meeting, latest step {seconds(r.replay_late_ms, 0)} ms late, destroyed "
                f"answered {seconds(r.destroyed_late_ms, 0)} ms after Janus sent it")
        after = (f"destroyed -> submitted {seconds(r.to_submitted)} s, started "
                 f"{seconds(r.to_started)} s, file {seconds(r.to_file)} s, {r.state} "
                 f"{seconds(r.to_done)} s; render {seconds(r.render_s)} s; "
                 f"{r.prerenders} prerenders, chunks kept {r.kept}")
        output = ("output " + (f"{r.duration:.3f} s ({(r.duration - r.span) * 1000:+.0f} ms)"
                               if r.duration is not None else "none"))
        problem = f"; PROBLEM: {r.problem}" if r.problem else ""
        extra = "".join(f"; {text}" for text in (r.live, r.compared) if text)
        return (f"{r.meeting} (room {r.room}), span {r.span:.3f} s: {late}; {after}; "
                f"{output}{extra}{problem}")

    def table(self) -> list[str]:
        rows = ["| meeting | span s | replay late ms (latest step / destroyed POST) | "
                "prerenders | chunks kept | -> submitted s | -> started s | render s | "
                "-> file s | -> done s | output s (vs span) |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.results:
            output = (f"{r.duration:.3f} ({(r.duration - r.span) * 1000:+.0f} ms)"
                      if r.duration is not None else "none")
            rows.append(
                f"| {r.meeting} | {r.span:.1f} | {seconds(r.replay_late_ms, 0)} / "
                f"{seconds(r.destroyed_late_ms, 0)} | {r.prerenders} | {r.kept} | "
                f"{seconds(r.to_submitted)} | "
                f"{seconds(r.to_started)} | {seconds(r.render_s)} | {seconds(r.to_file)} | "
                f"{seconds(r.to_done)} | {output} |")
        files = [r.to_file for r in self.results if r.to_file is not None]
        if files:
            rows.append("")
            rows.append(f"destroyed -> file on storage: median {statistics.median(files):.2f} s, "
                        f"max {max(files):.2f} s over {len(files)} meeting(s)")
            renders = [r.render_s for r in self.results if r.render_s is not None]
            submitted = [r.to_submitted for r in self.results if r.to_submitted is not None]
            rows.append(f"of which destroyed -> submitted: median "
                        f"{statistics.median(submitted):.2f} s; render: median "
                        f"{statistics.median(renders):.2f} s")
        return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meetings", nargs="+", default=None, metavar="FIXTURE",
                        help="fixtures of tests/fixtures to replay (default: every one with "
                        "events.jsonl)")
    parser.add_argument("--workers", type=int, default=2, help="farm workers (default 2)")
    parser.add_argument("--speed", type=float, default=1.0,
                        help="replay speed, 1 = the meeting's own pace (default 1)")
    parser.add_argument("--long", type=float, default=0.0, metavar="MINUTES",
                        help="replay each fixture's recordings end to end for this long")
    parser.add_argument("--settle", type=float, default=None,
                        help="MELTER_SETTLE_SECONDS (default: the service's, 2)")
    parser.add_argument("--prerender", type=float, default=20.0,
                        help="MELTER_PRERENDER_SECONDS: prerenders while a meeting goes on "
                        "(default 20, the service's; 0: none, the render starts at the end)")
    parser.add_argument("--layout", default=None,
                        help="MELTER_DEFAULT_LAYOUT: a layout name or file, or 'small' for "
                        "soak's 320x180 grid (default: the service's, grid at 1280x720)")
    parser.add_argument("--render-timeout", type=float, default=900.0,
                        help="seconds to wait for a job after its meeting's destroyed POST")
    parser.add_argument("--redis", default=os.environ.get(
        "MELTER_TTV_REDIS", "redis://127.0.0.1:6379/13"),
        help="Redis URL, a database of its own (default redis://127.0.0.1:6379/13)")
    parser.add_argument("--snapshot", choices=["none", "tree", "head"], default="none",
                        help="run the service, workers and replays from a copy of the "
                        "package taken at the start (see bench/soak.py)")
    parser.add_argument("--hls", action="store_true",
                        help="the service renders an HLS playlist: follow the live playlist "
                        "during the meeting (how far behind, FFmpeg reading it), then the VOD")
    parser.add_argument("--compare", action="store_true",
                        help="render each meeting again after it ended, in one pass "
                        "(melter render), and compare: frames, pictures, sound")
    parser.add_argument("--keep", action="store_true", help="keep the folder and its logs")
    args = parser.parse_args(argv)
    if args.speed <= 0:
        parser.error("--speed must be above 0")
    available = fixtures_with_events()
    meetings = args.meetings or available
    unknown = [m for m in meetings if m not in available]
    if unknown:
        parser.error(f"no fixture with events.jsonl: {', '.join(unknown)} "
                     f"(there are: {', '.join(available)})")
    bench = Bench(args)
    try:
        bench.farm.r.ping()
    except redis.RedisError as exc:
        shutil.rmtree(bench.farm.base, ignore_errors=True)
        print(f"time_to_video: no Redis at {args.redis}: {exc}", file=sys.stderr)
        return 2
    try:
        bench.start()
        env = bench.farm.env
        print(f"time_to_video: melter serve on 127.0.0.1:{bench.farm.port}, {args.workers} "
              f"worker(s), Redis {args.redis} prefix {bench.farm.prefix}, folder "
              f"{bench.farm.base}; layout {env.get('MELTER_DEFAULT_LAYOUT', 'grid (default)')}, "
              f"settle {env.get('MELTER_SETTLE_SECONDS', '2 (default)')} s, prerender every "
              f"{env.get('MELTER_PRERENDER_SECONDS')} s, speed "
              f"{args.speed:g}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
              flush=True)
        for index, fixture in enumerate(meetings):
            result = bench.run_meeting(index, fixture)
            bench.results.append(result)
            print(bench.line(result), flush=True)
        print(f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        for row in bench.table():
            print(row)
    finally:
        bench.close()
    failed = [r for r in bench.results if not r.ok]
    print("result: " + ("PASS" if not failed and bench.results else "FAIL"))
    return 0 if not failed and bench.results else 1


if __name__ == "__main__":
    sys.exit(main())
