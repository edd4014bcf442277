"""Shared setup for the farm tests (no tests here): a farm on a private Redis namespace with
real worker processes, meetings copied under a storage root, and measurements.

Each farm gets its own Redis database (11 by default, ``MELTER_TEST_REDIS_DB``) and its own key,
queue and broker-key prefixes, deleted afterwards. Workers are ``python -m melter.farm worker``
processes, each the leader of its own process group so a test can kill a worker with everything
under it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import redis
import yaml

from melter.farm.config import FarmConfig, load_config
from melter.farm.jobs import Farm
from melter.farm.procs import descendants
from tests.helpers.mjrwriter import T0_US, Stream, vp8_pictures

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent.parent / "fixtures"
REDIS_HOST = os.environ.get("MELTER_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("MELTER_TEST_REDIS_PORT", "6379"))
REDIS_DB = int(os.environ.get("MELTER_TEST_REDIS_DB", "11"))
FPS = 30
FRAME = 1 / FPS

#: A small canvas: the tests measure the farm, not the compositor.
SMALL_LAYOUT: dict[str, Any] = {
    "name": "small",
    "canvas": {"width": 320, "height": 180, "fps": FPS},
    "labels": {"enabled": False},
    "regions": [{"name": "grid", "max_rows": 4, "max_columns": 4, "fit": "crop"}],
}


def redis_available(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def test_redis_url() -> str:
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    if not redis_available(url):
        pytest.skip(f"no Redis at {url}")
    return url


test_redis_url.__test__ = False  # type: ignore[attr-defined]


@dataclass
class Worker:
    name: str
    process: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def melts(self) -> list[int]:
        """melt processes below this worker."""
        return [pid for pid in descendants(self.pid) if _comm(pid) == "melt"]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@dataclass
class FarmHarness:
    """A farm for one test: storage root, environment, workers, and the farm API."""

    base: Path
    redis_url: str
    settings: dict[str, str] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)

    def __post_init__(self) -> None:
        tag = secrets.token_hex(4)
        self.storage = self.base / "storage"
        self.outputs = self.storage / "out"
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.prefix = f"mtest-{tag}"
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "MELTER_BROKER_URL": self.redis_url,
            "MELTER_STORAGE_ROOT": str(self.storage),
            "MELTER_KEY_PREFIX": self.prefix,
            "MELTER_QUEUE_PREFIX": f"{self.prefix}-",
            "MELTER_BROKER_KEY_PREFIX": f"{self.prefix}:",
            "MELTER_LEASE_SECONDS": "4",
            "MELTER_HEARTBEAT_SECONDS": "0.5",
            "MELTER_SWEEP_SECONDS": "1",
            "MELTER_DISPATCH_GRACE_SECONDS": "10",
            "MELTER_RETRY_BACKOFF_SECONDS": "0.5",
            "MELTER_CACHE_DIR": str(self.base / "cache"),
            # Jobs submitted with ``stand_in`` run bench/stand_in.py instead of melt.
            "MELTER_UNIT_HOOK": "bench.stand_in:run_unit",
            **self.settings,
        }
        self.env.pop("MELTER_CONFIG", None)
        self.config: FarmConfig = load_config(self.env)
        self.farm = Farm(self.config)

    # -- workers -------------------------------------------------------------------------------
    def start_worker(self, name: str, concurrency: int = 1, wait: bool = True) -> Worker:
        log = self.base / f"{name}.log"
        handle = log.open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "melter.farm", "worker", "-c", str(concurrency),
             "-n", f"{name}@test", "--loglevel", "info"],
            env=self.env, cwd=self.base, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True)
        handle.close()
        worker = Worker(f"{name}@test", process, log)
        self.workers.append(worker)
        if wait:
            self.wait_ready([worker])
        return worker

    def start_workers(self, names: list[str], concurrency: int = 1) -> list[Worker]:
        started = [self.start_worker(n, concurrency, wait=False) for n in names]
        self.wait_ready(started)
        return started

    def wait_ready(self, workers: list[Worker], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for worker in workers:
            while " ready." not in worker.text():
                if worker.process.poll() is not None:
                    raise AssertionError(f"worker {worker.name} exited:\n{worker.text()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"worker {worker.name} not ready:\n{worker.text()}")
                time.sleep(0.1)

    def kill_group(self, worker: Worker) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.process.wait(timeout=10)

    def stop_workers(self) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for worker in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout=5)
        self.workers.clear()

    def cleanup(self) -> None:
        self.stop_workers()
        client = redis.Redis.from_url(self.redis_url)
        try:
            keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start:start + 500])
        except redis.RedisError:
            pass

    # -- jobs ----------------------------------------------------------------------------------
    def meeting(self, fixture: str, name: str | None = None) -> Path:
        """A copy of a fixture meeting under the storage root."""
        target = self.storage / "meetings" / (name or fixture)
        shutil.copytree(FIXTURES / fixture, target)
        return target

    def submit(self, meeting: Path, output: str, **options: Any) -> str:
        spec: dict[str, Any] = {"inputs": [str(meeting)], "layout": SMALL_LAYOUT,
                                "outputs": [{"path": str(self.outputs / output)}]}
        stand_in = options.pop("stand_in", None)
        if stand_in is not None:
            options["metadata"] = {**options.get("metadata", {}), "stand_in": stand_in}
        spec.update(options)
        return self.farm.submit(spec)

    def status(self, job: str) -> dict[str, Any]:
        return self.farm.status(job)

    def wait(self, job: str, states: tuple[str, ...] = ("done", "failed", "cancelled"),
             timeout: float = 120, check: Callable[[], None] | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.status(job)
            if info["state"] in states:
                return info
            if check is not None:
                check()
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {w.name}\n{w.text()[-3000:]}" for w in self.workers)
                raise AssertionError(f"job {job} still {info['state']} after {timeout} s: "
                                     f"{json.dumps(info)[:2000]}\n{logs}")
            time.sleep(0.1)

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> float:
        began = time.monotonic()
        while not condition():
            if time.monotonic() - began > timeout:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)
        return time.monotonic() - began

    def run_cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "melter.farm", *args], env=self.env,
                              cwd=self.base, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"melter {' '.join(args)}: {done.returncode}\n{done.stderr}")
        return done


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[FarmHarness]:
    farm = FarmHarness(tmp_path, test_redis_url())
    try:
        yield farm
    finally:
        farm.cleanup()


# -- measuring ---------------------------------------------------------------------------------
def video_frame_count(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def audio_samples(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        chunks = [frame.to_ndarray() for frame in container.decode(audio=0)]
    return np.concatenate(chunks, axis=1) if chunks else np.zeros((2, 0), np.float32)


def same_audio(got: np.ndarray, ref: np.ndarray, edge: int = 2048) -> dict[str, float]:
    """How far decoded audio ``got`` (a chunked render: AAC pieces joined) is from ``ref``
    (the single pass, encoded once), away from the first and last ``edge`` samples, and
    checks that it is the same sound at the same samples: its difference is at the level of
    two encodings of one signal (under -50 dB RMS of full scale), and moving it by one sample
    either way makes that difference at least twice as large (no sample lost or repeated).
    """
    assert got.shape == ref.shape, (got.shape, ref.shape)
    a, b = got[:, edge:-edge], ref[:, edge:-edge]

    def rms(x: np.ndarray) -> float:
        return float(np.sqrt(np.mean(x ** 2)))

    found = {"rms": rms(a - b), "max": float(np.abs(a - b).max()),
             "rms_shifted": min(rms(a[:, 1:] - b[:, :-1]), rms(a[:, :-1] - b[:, 1:]))}
    assert found["rms"] < 0.003, found
    assert found["rms_shifted"] > 2 * found["rms"], found
    return found


@dataclass
class FrameStats:
    times: np.ndarray  # seconds
    means: np.ndarray  # mean Y, U, V of each frame
    white: np.ndarray  # fraction of near-white pixels (luma above 225)

    def white_onsets(self, fraction: float = 0.05) -> list[float]:
        """Times of the frames where near-white first covers ``fraction`` of the picture."""
        flags = self.white > fraction
        starts = np.flatnonzero(flags & ~np.concatenate([[False], flags[:-1]]))
        return [float(self.times[i]) for i in starts]


def frame_stats(path: Path) -> FrameStats:
    """Per decoded frame: time, mean of each plane, white fraction (one pass, no RGB)."""
    times: list[float] = []
    means: list[tuple[float, float, float]] = []
    white: list[float] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            planes = frame.to_ndarray()  # yuv420p: Y rows, then U and V
            height = frame.height
            luma = planes[:height]
            chroma = planes[height:].reshape(-1)
            half = len(chroma) // 2
            times.append(float(frame.pts * frame.time_base))
            means.append((float(luma.mean()), float(chroma[:half].mean()),
                          float(chroma[half:].mean())))
            white.append(float((luma > 225).mean()))
    return FrameStats(np.array(times), np.array(means), np.array(white))


def tone_onsets(path: Path, freq: float, rate: int = 48000) -> list[float]:
    """Times where a tone at ``freq`` starts (20 ms windows, 2 ms hops)."""
    samples = audio_samples(path).mean(axis=0)
    window = 960
    hop = 96
    t = np.arange(window) / rate
    probe = np.hanning(window) * np.exp(-2j * np.pi * freq * t)
    starts = np.arange(0, len(samples) - window, hop)
    frames = np.lib.stride_tricks.sliding_window_view(samples, window)[starts]
    level = np.abs(frames @ probe)
    threshold = level.max() / 2
    onsets = []
    above = False
    for start, value in zip(starts, level, strict=True):
        if value > threshold and not above:
            # The window's middle crosses the onset when half of it holds the tone.
            onsets.append((start + window / 2) / rate)
        above = value > threshold
    return onsets


# -- a long synthetic meeting -------------------------------------------------------------------
@dataclass(frozen=True)
class Person:
    uid: str
    colour: tuple[int, int, int]
    tone: float
    start: float
    end: float
    markers: bool = False


MARKER_EVERY = 10.0
#: Markers at 7 s, 17 s, 27 s…: the first chunk ends at 27 s, where person 602 joins.
MARKER_AT = 7.0
MARKER_LENGTH = 0.2
VIDEO_FPS = 10
GROUP = 2  # pictures per encoded group (a key frame each): 0.2 s at 10 fps
#: Pictures are taken this long after a multiple of 0.1 s of the meeting, so a marker's first
#: picture falls between two 30 fps output frames, nearer the earlier one.
VIDEO_LAG = 0.010


def long_meeting_people(seconds: float) -> list[Person]:
    return [
        Person("601", (200, 40, 40), 400.0, 0.0, seconds, markers=True),
        Person("602", (40, 160, 60), 600.0, seconds * 0.3, seconds * 0.65),
        Person("603", (40, 70, 200), 1000.0, seconds * 0.5, seconds),
    ]


def _opus(person: Person) -> list[bytes]:
    rate = 48000
    seconds = person.end - person.start
    t = np.arange(round((seconds + 0.1) * rate)) / rate
    freq = np.full(len(t), person.tone)
    if person.markers:
        phase = np.mod(t, MARKER_EVERY)
        onset = MARKER_AT + VIDEO_LAG
        freq[(phase >= onset) & (phase < onset + MARKER_LENGTH)] *= 2
    pcm = np.round(0.3 * np.sin(2 * np.pi * np.cumsum(freq) / rate) * 32767).astype(np.int16)
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = rate  # type: ignore[attr-defined]
    encoder.layout = "mono"  # type: ignore[attr-defined]
    encoder.format = "s16"  # type: ignore[attr-defined]
    encoder.options = {"frame_duration": "20", "application": "audio", "b": "32000"}
    encoder.open()
    packets: list[bytes] = []
    for pos in range(0, len(pcm) - 960 + 1, 960):
        frame = av.AudioFrame.from_ndarray(pcm[None, pos:pos + 960], format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = pos
        packets += [bytes(p) for p in encoder.encode(frame)]  # type: ignore[attr-defined]
    packets += [bytes(p) for p in encoder.encode(None)]  # type: ignore[attr-defined]
    return packets[: round(seconds * 50)]


def write_long_meeting(folder: Path, seconds: float) -> list[Person]:
    """A VideoRoom meeting of three synthetic people at 10 fps; person 601 flashes white and
    doubles its tone for 0.2 s at 7.01 s, 17.01 s, 27.01 s… of the meeting (sync markers)."""
    folder.mkdir(parents=True, exist_ok=True)
    people = long_meeting_people(seconds)
    for number, person in enumerate(people):
        first = T0_US + round(person.start * 1e6)
        audio = Stream.audio(_opus(person), 960, codec="opus", start_us=first,
                             ssrc=0x1000 + number)
        audio.write(folder / f"videoroom-77-user-{person.uid}-{first}-audio-0.mjr")
        normal = vp8_pictures(GROUP, (320, 240), person.colour, fps=VIDEO_FPS, gop=GROUP)
        white = vp8_pictures(GROUP, (320, 240), (255, 255, 255), fps=VIDEO_FPS, gop=GROUP)
        pictures = []
        groups = round((person.end - person.start) * VIDEO_FPS / GROUP)
        for g in range(groups):
            t = g * GROUP / VIDEO_FPS + person.start
            phase = t % MARKER_EVERY
            marked = person.markers and abs(phase - MARKER_AT) < 1e-6
            pictures.extend(white if marked else normal)
        video = Stream.vp8(pictures, start_us=first + round(VIDEO_LAG * 1e6), fps=VIDEO_FPS,
                           ssrc=0x2000 + number)
        video.write(folder / f"videoroom-77-user-{person.uid}-{first + 91}-video-1.mjr")
    (folder / "meeting.yaml").write_text(yaml.safe_dump({"room": "77"}))
    return people
