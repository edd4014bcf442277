#!/usr/bin/env python3
"""Benchmark ``melter render`` (MLT's ``melt``) against a hand-written ``ffmpeg`` composition.

Steps:

1. Build a four-participant VideoRoom meeting of MJR00002 recordings with the test-side writer
   (``tests/mjrwriter.py``): 640x360 15 fps VP8 at about 500 kb/s (a moving, grainy picture
   around a solid patch of the participant's colour, encoded by the system ``ffmpeg``/libvpx in
   real-time mode) and 20 ms Opus tones. They join at 0, 5, 12 and 20 s and all stay to the end.
   The meeting is cached under ``<out>/render-meeting/``.
2. Prepare the media once (``melter render --workdir W``, timed: a cold render) and read the
   same prepared files back in-process with :func:`melter.compose.prepare_media`.
3. In turns, ``--runs`` times each: ``melter render`` reusing ``W``; ``melt`` alone on the same
   MLT document melter writes; ``ffmpeg`` with an equivalent ``filter_complex`` on the same
   prepared files; and the media preparation alone (discover + prepare_media into an empty
   folder). Each child's wall time, CPU time (user + system of the whole tree, ``os.wait4``),
   peak RSS (largest single process, ``ru_maxrss``) and the peak summed RSS of its process tree
   (sampled from ``/proc`` every 50 ms) are recorded; the table shows medians.
4. Check that the outputs did the same work: frame count, durations, the colour at each tile's
   centre at a few instants (PyAV), audio level per scene, and the mean difference between the
   melter and ffmpeg pictures.
5. Profile one melter render with ``perf record -e cpu-clock -g`` and summarise where ``melt``
   spends its time by shared object and by symbol.

Run from the repository root::

    python bench/render_bench.py                       # 60 s meeting, 3 runs of each
    python bench/render_bench.py --seconds 30 --runs 1 --no-profile   # quick check
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"

#: Bump when the generated meeting changes, so an old cached one is rebuilt.
MEETING_VERSION = 1
ROOM = "7100"
VIDEO_SIZE = (640, 360)
VIDEO_FPS = 15
VIDEO_KBPS = 500
VIDEO_GOP = 150  # a key frame every 10 s (WebRTC senders send them rarely)
#: The solid patch at the centre of every picture (source pixels): what the colour check reads.
PATCH = (160, 120)


@dataclass(frozen=True)
class Person:
    uid: str
    display: str
    colour: tuple[int, int, int]
    tone: float
    join_s: float


PEOPLE = (
    Person("1001", "Ada", (200, 40, 40), 330.0, 0.0),
    Person("1002", "Ben", (40, 160, 60), 440.0, 5.0),
    Person("1003", "Cy", (40, 70, 200), 550.0, 12.0),
    Person("1004", "Di", (210, 180, 40), 660.0, 20.0),
)

#: Canvas, codec settings: the ``mp4`` preset (grid layout canvas 1280x720 at 30 fps).
CANVAS = (1280, 720)
FPS = 30
X264 = ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p",
        "-g", "60"]
AAC = ["-c:a", "aac", "-b:a", "128k", "-ar", "48000", "-ac", "2"]
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


# -- environment ------------------------------------------------------------------------------
def snapshot_melter(folder: Path) -> Path:
    """Copy the melter package and the built-in layouts; import melter from the copy."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "melter", folder / "melter", ignore=ignore)
    # melter.layout.model finds the built-in layouts beside the package.
    shutil.copytree(REPO / "layouts", folder / "layouts", ignore=ignore)
    return folder


def source_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted((root / "melter").rglob("*.py")) + sorted((root / "layouts").glob("*")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  check=False).stdout.strip()
        except OSError:
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "melter", "layouts")
               .splitlines() if line]
    return {"commit": git("rev-parse", "--short", "HEAD"), "changed": changed}


def tool_version(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError:
        return "missing"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else ""


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- building the meeting --------------------------------------------------------------------
def _pictures_rgb(person: Person, count: int, seed: int):  # type: ignore[no-untyped-def]
    """Camera-like RGB pictures: a drifting shaded pattern with sensor grain in the
    participant's colour, a bright block sweeping across the top, a solid centre patch."""
    width, height = VIDEO_SIZE
    rng = np.random.default_rng(seed)
    xs = np.arange(width, dtype=np.float32)
    ys = np.arange(height, dtype=np.float32)
    base = np.array(person.colour, np.int16)
    tint = np.array([1.0, 0.8, 0.6], np.float32)
    grains = [rng.integers(-3, 4, (height, width, 1), dtype=np.int16) for _ in range(7)]
    pw, ph = PATCH
    px, py = (width - pw) // 2, (height - ph) // 2
    for index in range(count):
        phase = index * 0.12
        wave = np.outer(np.cos(ys / 29.0 - phase * 0.7), np.sin(xs / 37.0 + phase)) * 28.0
        image = (wave[..., None] * tint).astype(np.int16) + base + grains[index % len(grains)]
        image[py : py + ph, px : px + pw] = base
        bx = int((width - 48) * (0.5 + 0.5 * math.sin(index * 0.05)))
        image[20:68, bx : bx + 48] = 255
        yield np.clip(image, 0, 255).astype(np.uint8)


def _read_ivf(path: Path) -> list[tuple[bytes, bool]]:
    """(frame, key frame?) of an IVF file (VP8: bit 0 of the frame tag is 0 on key frames)."""
    data = path.read_bytes()
    if data[:4] != b"DKIF":
        raise RuntimeError(f"{path}: not IVF")
    pos = int.from_bytes(data[6:8], "little")
    frames = []
    while pos + 12 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "little")
        frame = data[pos + 12 : pos + 12 + size]
        frames.append((frame, not frame[0] & 1))
        pos += 12 + size
    return frames


def encode_vp8(person: Person, count: int, seed: int, work: Path) -> list[tuple[bytes, bool]]:
    """VP8 frames from the system ffmpeg's libvpx (real-time mode, as WebRTC senders use).

    PyAV's bundled libvpx encodes these pictures several times slower, so the pictures are
    piped to ``ffmpeg`` instead.
    """
    width, height = VIDEO_SIZE
    ivf = work / f"{person.uid}.ivf"
    command = [
        "ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(VIDEO_FPS),
        "-i", "-",
        "-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8", "-b:v", f"{VIDEO_KBPS}k",
        "-g", str(VIDEO_GOP), "-lag-in-frames", "0", "-auto-alt-ref", "0",
        "-error-resilient", "1", "-threads", "1", "-f", "ivf", str(ivf),
    ]
    process = subprocess.Popen(command, stdin=subprocess.PIPE)
    assert process.stdin is not None
    for picture in _pictures_rgb(person, count, seed):
        process.stdin.write(picture.tobytes())
    process.stdin.close()
    if process.wait() != 0:
        raise RuntimeError(f"ffmpeg failed to encode VP8 for {person.uid}")
    frames = _read_ivf(ivf)
    ivf.unlink()
    if len(frames) != count or not frames[0][1]:
        raise RuntimeError(f"VP8 for {person.uid}: {len(frames)} frames, wanted {count}")
    return frames


def build_meeting(folder: Path, seconds: float) -> dict[str, Any]:
    """Write the meeting (cached: reused when its manifest matches)."""
    sys.path.insert(0, str(TESTS))
    try:
        from mjrwriter import T0_US, Picture, Stream
    finally:
        sys.path.remove(str(TESTS))

    manifest_path = folder / "manifest.json"
    wanted = {
        "version": MEETING_VERSION, "seconds": seconds, "size": list(VIDEO_SIZE),
        "fps": VIDEO_FPS, "kbps": VIDEO_KBPS, "gop": VIDEO_GOP,
        "people": [p.__dict__ for p in PEOPLE],
    }
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("spec") == wanted:
            manifest["cached"] = True
            return manifest
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    work = folder / ".work"
    work.mkdir()
    started = time.monotonic()
    files = []
    for number, person in enumerate(PEOPLE):
        length = seconds - person.join_s
        first_us = T0_US + round(person.join_s * 1e6)
        audio = Stream.opus(length, person.tone, 20, start_us=first_us, ssrc=0x3000 + number)
        name = f"videoroom-{ROOM}-user-{person.uid}-{first_us}-audio-0.mjr"
        audio.write(folder / name)
        files.append(name)
        count = round(length * VIDEO_FPS)
        encoded = encode_vp8(person, count, seed=number, work=work)
        pictures = [Picture(data, key, *VIDEO_SIZE) for data, key in encoded]
        video = Stream.vp8(pictures, start_us=first_us, ssrc=0x4000 + number,
                           picture_id=1000 * (number + 1))
        name = f"videoroom-{ROOM}-user-{person.uid}-{first_us + 91}-video-1.mjr"
        video.write(folder / name)
        files.append(name)
    work.rmdir()
    (folder / "meeting.yaml").write_text(
        "participants:\n" + "".join(f"  '{p.uid}': {{display: {p.display}}}\n" for p in PEOPLE))
    manifest = {
        "spec": wanted,
        "files": {name: (folder / name).stat().st_size for name in files},
        "build_s": round(time.monotonic() - started, 1),
    }
    manifest_path.write_text(json.dumps(manifest, indent=1))
    manifest["cached"] = False
    return manifest
