#!/usr/bin/env python3
"""Benchmark ``melter render`` (MLT's ``melt``) against a hand-written ``ffmpeg`` composition.

Steps:

1. Build a four-participant VideoRoom meeting of MJR00002 recordings with the test-side writer
   (``tests/helpers/mjrwriter.py``): 640x360 15 fps VP8 at about 500 kb/s (a moving, grainy picture
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
   (sampled from ``/proc`` every 50 ms) are recorded; the table shows medians. Two
   diagnostics run in the same turns: ``melt`` and ``ffmpeg`` without the name labels.
4. Check that the outputs did the same work: frame count, durations, the colour at each tile's
   centre at a few instants (PyAV), audio level per scene, and the mean difference between the
   melter and ffmpeg pictures.
5. Profile one melter render and one ffmpeg run with ``perf record -e cpu-clock -g`` and set
   side by side where ``melt`` and ``ffmpeg`` spend their CPU time, by shared object
   (``<out>/render_profile.txt`` has the symbols too).

Run from the repository root::

    python -m bench.render_bench                       # 60 s meeting, 3 runs of each
    python -m bench.render_bench --seconds 30 --runs 1 --no-profile   # quick check
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

#: Bump when the generated meeting changes, so an old cached one is rebuilt.
MEETING_VERSION = 1
ROOM = "7100"
VIDEO_SIZE = (640, 360)
VIDEO_FPS = 15
VIDEO_KBPS = 500
VIDEO_GOP = 150  # a key frame every 10 s (WebRTC senders send them rarely)
#: Each tone's amplitude: four together peak at 0.8, so the mix never clips.
TONE_AMPLITUDE = 0.2
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
    # Where an install puts them (setup.py): the package melter.layout.builtin.
    shutil.copytree(REPO / "layouts", folder / "melter" / "layout" / "builtin", ignore=ignore)
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
    from tests.helpers.mjrwriter import T0_US, Picture, Stream, opus_packets

    manifest_path = folder / "manifest.json"
    wanted = {
        "version": MEETING_VERSION, "seconds": seconds, "tone_amplitude": TONE_AMPLITUDE,
        "size": list(VIDEO_SIZE),
        "fps": VIDEO_FPS, "kbps": VIDEO_KBPS, "gop": VIDEO_GOP,
        "people": [p.__dict__ for p in PEOPLE],
    }
    wanted = json.loads(json.dumps(wanted))  # tuples as lists, as the manifest has them
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
        payloads = opus_packets(length, person.tone, 20, TONE_AMPLITUDE)
        audio = Stream.audio(payloads, 960, codec="opus", start_us=first_us,
                             ssrc=0x3000 + number)
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


# -- the ffmpeg equivalent ---------------------------------------------------------------------
def _text(value: str) -> str:
    """A drawtext ``text`` value, quoted for the filter graph."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'").replace(":", "\\:") + "'"


def ffmpeg_graph(plan: Any, media: dict[str, Any], frames: int,
                 label_size: int = 20, labels: bool = True
                 ) -> tuple[list[Path], str, dict[str, Any]]:
    """Inputs and a ``filter_complex`` drawing ``plan`` the way melter's MLT document does.

    Per scene and per tile the participant's decoded video is trimmed to the scene (plus one
    source frame before it, so the first output frame has a picture to hold), scaled to cover
    the cell and centre-cropped (``crop_to_fill``), moved onto the output timeline with
    ``setpts`` and overlaid with ``enable='between(t,a,b)'``. Names are drawn like melter's
    labels (bottom-left, 6 px padding, 60 % black box, DejaVu Sans). Each segment's audio is
    delayed to its first frame and mixed with ``amix normalize=0`` (melt: ``mix sum=1``).
    """
    from melter.engine.mlt import _merge_spans as merge_spans

    fps = plan.fps
    duration = frames / fps
    used = sorted({p.segment for s in plan.scenes for p in s.placements}
                  | {seg for s in plan.scenes for seg in s.audio})
    inputs = [media[seg].path for seg in used]
    index = {seg: n for n, seg in enumerate(used)}
    tiles: dict[str, list[tuple[int, int, Any]]] = {}
    label_runs: dict[tuple[str, int, int], list[tuple[int, int]]] = {}
    for scene in plan.scenes:
        first = round(scene.start_us * fps / 1e6)
        last = min(frames, round(scene.end_us * fps / 1e6)) - 1
        if last < first:
            continue
        for placement in scene.placements:
            if not placement.video or not media[placement.segment].has_video:
                raise NotImplementedError("placeholder cards are not drawn by the ffmpeg graph")
            tiles.setdefault(placement.segment, []).append((first, last, placement))
            cell = placement.rect
            x, y = cell.x + 4 + 6, cell.y + cell.height - 4 - 6
            label_runs.setdefault((placement.display, x, y), []).append((first, last))

    chains: list[str] = [f"color=c=black:s={plan.width}x{plan.height}:r={fps}:d={duration}"
                         f",format=yuv420p[bg0]"]
    overlays: list[tuple[str, int, int, int, int]] = []
    for seg, uses in tiles.items():
        prepared = media[seg]
        n = index[seg]
        names = [f"s{n}u{k}" for k in range(len(uses))]
        if len(uses) > 1:
            chains.append(f"[{n}:v]split={len(uses)}" + "".join(f"[{name}]" for name in names))
        else:
            names = [f"{n}:v"]
        interval = prepared.frame_interval or 1 / 15
        source_rate = round(1 / interval)
        # Where a picture lands on the ffmpeg timeline: file time + the segment's first frame
        # + offset. melt shows each picture from the output frame nearest its time (prepared
        # files keep the pictures' own times); overlay shows the latest picture stamped at or
        # before an output frame's time, so pictures are moved back by half an output frame.
        offset = -0.5 / fps
        for name, (first, last, placement) in zip(names, uses, strict=True):
            # Keep from the picture shown at the scene's first frame to the one at its last.
            start = max(0.0, (first - prepared.start_frame) / fps - offset - interval - 0.001)
            end = (last + 1 - prepared.start_frame) / fps - offset
            box = placement.content
            if placement.fit == "crop":
                fit = (f"scale=w={box.width}:h={box.height}:force_original_aspect_ratio=increase"
                       f":flags=bilinear,crop={box.width}:{box.height}")
            else:
                fit = f"scale=w={box.width}:h={box.height}:flags=bilinear"
            tile = f"t{len(overlays)}"
            # Padding: whole source frames of black from 0 s up to where the kept pictures
            # begin on the output, so every overlay has a secondary picture from the start and
            # never holds canvas frames back waiting for one (without it ffmpeg's peak RSS was
            # about 1 GB). tpad moves the real pictures on by the padding, in a 1/90000 time
            # base so its steps add up exactly; setpts takes that back off. After a tile's
            # last picture overlay holds it (eof_action=repeat) until its enable window closes.
            place = prepared.start_frame / fps + offset
            pad = max(0, math.floor((place + start) * source_rate + 1e-6))
            shift = place - pad / source_rate
            chains.append(
                f"[{name}]trim=start={start:.6f}:end={end:.6f},settb=1/90000,"
                f"setpts=PTS{shift:+.6f}/TB,{fit},"
                f"tpad=start={pad}:start_mode=add:color=black[{tile}]")
            overlays.append((tile, box.x, box.y, first, last))
    base = "bg0"
    for number, (tile, x, y, first, last) in enumerate(overlays):
        out = f"bg{number + 1}"
        chains.append(
            f"[{base}][{tile}]overlay=x={x}:y={y}:eof_action=repeat:format=yuv420:"
            f"enable='between(t,{(first - 0.5) / fps:.6f},{(last + 0.5) / fps:.6f})'[{out}]")
        base = out
    texts = []
    for (display, x, y), runs in (label_runs.items() if labels else ()):
        for first, last in merge_spans(runs):
            texts.append(
                f"drawtext=fontfile={FONT}:text={_text(display)}:fontsize={label_size}"
                f":fontcolor=white:box=1:boxcolor=black@0.6:boxborderw=6"
                f":x={x}:y={y}-th"
                f":enable='between(t,{(first - 0.5) / fps:.6f},{(last + 0.5) / fps:.6f})'")
    # After the canvas's last frame, overlay's frame sync can still emit a few frames driven
    # by tiles that have not ended (seen: 4 extra frames at 60.0 s): cut at the plan's length.
    chains.append(f"[{base}]trim=end_frame={frames}," + ",".join(texts or ["null"]) + "[vout]")

    heard = sorted({seg for s in plan.scenes for seg in s.audio if media[seg].has_audio})
    mixed = []
    for seg in heard:
        prepared = media[seg]
        delay_ms = round(prepared.start_frame * 1000 / fps)
        end = min(prepared.frames, frames - prepared.start_frame) / fps
        chains.append(f"[{index[seg]}:a]atrim=end={end:.6f},asetpts=PTS-STARTPTS,"
                      f"adelay=delays={delay_ms}:all=1[a{index[seg]}]")
        mixed.append(f"[a{index[seg]}]")
    chains.append(
        "".join(mixed) + f"amix=inputs={len(mixed)}:normalize=0:duration=longest,"
        f"apad=whole_dur={duration:.6f},atrim=end={duration:.6f},"
        "aformat=sample_fmts=fltp:sample_rates=48000:channel_layouts=stereo[aout]")
    summary = {"inputs": len(inputs), "overlays": len(overlays), "labels": len(texts),
               "audio_inputs": len(mixed)}
    return inputs, ";\n".join(chains), summary


def exact_cells_layout(layout: Any) -> Any:
    """``layout`` with one fixed quadrant per participant, each exactly the sources' size.

    Four 640x360 cells fill the 1280x720 canvas with no padding and no names: a composition in
    which nothing is scaled, for melt and for ffmpeg alike.
    """
    width, height = VIDEO_SIZE
    columns = CANVAS[0] // width
    regions = [
        {"name": f"cell{n}", "sources": [person.uid], "x": (n % columns) * width,
         "y": (n // columns) * height, "width": width, "height": height, "padding": 0,
         "max_rows": 1, "max_columns": 1}
        for n, person in enumerate(PEOPLE)
    ]
    return type(layout).model_validate({
        "name": "source-size-cells", "canvas": layout.canvas.model_dump(),
        "regions": regions, "labels": {"enabled": False},
    })


def ffmpeg_command(inputs: list[Path], script: Path, output: Path) -> list[str]:
    command = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y"]
    for path in inputs:
        command += ["-i", str(path)]
    return [*command, "-filter_complex_script", str(script), "-map", "[vout]", "-map", "[aout]",
            *X264, *AAC, "-movflags", "+faststart", str(output)]


# -- measuring children ------------------------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo += [int(c) for c in handle.read().split()]
        except OSError:
            continue
    return pids


def _tree_rss(pid: int) -> int:
    total = 0
    for member in _tree(pid):
        try:
            with open(f"/proc/{member}/statm") as handle:
                total += int(handle.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


@dataclass
class Measurement:
    wall_s: float
    cpu_s: float
    user_s: float
    sys_s: float
    max_rss_mb: float  # the largest single process of the tree (ru_maxrss)
    tree_rss_mb: float  # the largest sampled sum over the tree
    exit_code: int
    load: list[float] = field(default_factory=list)


def run_measured(command: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> Measurement:
    """Run a child; its tree's CPU time and peak RSS come from ``os.wait4``."""
    with open(log, "wb") as sink:
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=sink, stderr=sink, env=env, cwd=cwd,
                                   stdin=subprocess.DEVNULL)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], _tree_rss(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - started
        done.set()
        sampler.join()
        process.returncode = os.waitstatus_to_exitcode(status)
    return Measurement(
        round(wall, 3), round(usage.ru_utime + usage.ru_stime, 3), round(usage.ru_utime, 3),
        round(usage.ru_stime, 3), round(usage.ru_maxrss / 1024, 1), round(peak[0] / 2**20, 1),
        process.returncode, load_average())


# -- checking the outputs ----------------------------------------------------------------------
def probe_output(path: Path, plan: Any, colours: dict[str, tuple[int, int, int]],
                 instants: list[float]) -> dict[str, Any]:
    """Frame count, durations, tile-centre colours at ``instants``, audio RMS per scene."""
    import av

    fps = plan.fps
    pictures: dict[float, np.ndarray] = {}
    wanted = {round(t * fps): t for t in instants}
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        info: dict[str, Any] = {
            "container_s": round((container.duration or 0) / 1e6, 3),
            "size": [video.codec_context.width, video.codec_context.height],
            "video_codec": video.codec_context.name,
        }
        count = 0
        last_pts = None
        for frame in container.decode(video):
            number = round(float(frame.pts * frame.time_base) * fps)
            if number in wanted:
                pictures[wanted[number]] = frame.to_ndarray(format="rgb24")
            count += 1
            last_pts = frame.pts * frame.time_base
        info["frames"] = count
        info["video_s"] = round(float(last_pts) + 1 / fps, 3) if last_pts is not None else 0
    with av.open(str(path)) as container:
        audio = container.streams.audio[0]
        chunks = [frame.to_ndarray() for frame in container.decode(audio)]
        rate = audio.codec_context.sample_rate
        samples = np.concatenate([c.reshape(c.shape[0], -1) if c.ndim == 2 else c[None]
                                  for c in chunks], axis=1)
        if samples.shape[0] > 2:  # packed
            samples = samples.reshape(-1, audio.codec_context.channels).T
        info["audio_s"] = round(samples.shape[1] / rate, 3)
        info["audio_channels"] = int(samples.shape[0])
        levels = []
        for scene in plan.scenes:
            a = round((scene.start_us / 1e6 + 0.5) * rate)
            b = round((scene.end_us / 1e6 - 0.5) * rate)
            if b > a:
                rms = float(np.sqrt(np.mean(samples[0, a:b].astype(np.float64) ** 2)))
                expected = math.sqrt(len(scene.audio) * TONE_AMPLITUDE**2 / 2)
                levels.append({"from_s": round(scene.start_us / 1e6, 2),
                               "to_s": round(scene.end_us / 1e6, 2),
                               "rms": round(rms, 4), "tones_rms": round(expected, 4)})
        info["audio_rms"] = levels
    tiles = []
    worst = 0.0
    for t in instants:
        scene = next(s for s in plan.scenes if s.start_us <= t * 1e6 < s.end_us)
        picture = pictures.get(t)
        for placement in scene.placements:
            box = placement.content
            x, y = box.x + box.width // 2, box.y + box.height // 2
            if picture is None:
                tiles.append({"t": t, "who": placement.display, "missing": True})
                worst = 255.0
                continue
            seen = picture[y - 4 : y + 4, x - 4 : x + 4].reshape(-1, 3).mean(axis=0)
            expected = np.array(colours[placement.participant], float)
            error = float(np.abs(seen - expected).max())
            worst = max(worst, error)
            tiles.append({"t": t, "who": placement.display, "at": [x, y],
                          "rgb": [round(v) for v in seen], "expected": list(colours[
                              placement.participant]), "max_error": round(error, 1)})
    info["tiles"] = tiles
    info["tile_max_error"] = round(worst, 1)
    info["_pictures"] = pictures
    return info


def picture_difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Mean absolute RGB difference between two outputs' pictures at the same instants."""
    out = {}
    for t, picture in a["_pictures"].items():
        other = b["_pictures"].get(t)
        if other is not None and other.shape == picture.shape:
            out[str(t)] = round(float(np.abs(picture.astype(np.int16) - other).mean()), 2)
    return out


# -- profiling ---------------------------------------------------------------------------------
PERF_HZ = 999
_PERF_ROW = re.compile(r"^\s*([\d.]+)%\s+(\d+)\s+(.+?)\s*$")


def _perf_rows(data: Path, *args: str) -> list[tuple[float, int, str]]:
    """(percent, samples, key) rows of ``perf report`` (self time, no call graph)."""
    result = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none", "-n",
         "--percent-limit", "0.2", *args],
        capture_output=True, text=True, check=False)
    rows = []
    for line in result.stdout.splitlines():
        match = _PERF_ROW.match(line)
        if match and not line.startswith("#"):
            rows.append((float(match.group(1)), int(match.group(2)),
                         re.sub(r"\s{2,}", "  ", match.group(3))))
    return rows


def perf_profile(name: str, command: list[str], env: dict[str, str] | None, out: Path,
                 comm: str, keep: bool) -> dict[str, Any]:
    """``perf record -e cpu-clock -g`` over one run; ``comm``'s samples by shared object.

    Seconds are samples / sampling rate (cpu-clock counts CPU time, so a sample is about
    1/999 s of one CPU). Self time only: Debian's libraries lack frame pointers, so the
    call chains do not say reliably who called a library. Rows are sorted by process *and*
    object, then filtered here: ``perf report --comms X --sort dso`` drops every object that
    another process of the run used first (libc, the kernel), as its entries merge before the
    filter.
    """
    data = out / f"perf-{name}.data"
    log = out / f"perf-{name}.log"
    record = ["perf", "record", "-e", "cpu-clock", "-F", str(PERF_HZ), "-g", "-o", str(data),
              "--", *command]
    measured = run_measured(record, log, env=env)
    if measured.exit_code != 0 or not data.exists():
        return {"skipped": f"perf record failed (exit {measured.exit_code}); see {log}"}
    by_comm = _perf_rows(data, "--sort", "comm")
    total = sum(n for _, n, _ in by_comm)
    own = sum(n for _, n, key in by_comm if key == comm) or 1

    def mine(sort: str) -> list[tuple[float, int, str]]:
        rows = []
        for _, n, key in _perf_rows(data, "--sort", sort):
            process, _, rest = key.partition(" ")
            if process == comm:
                rows.append((round(100 * n / own, 2), n, rest.strip()))
        return sorted(rows, key=lambda row: -row[1])

    by_dso = mine("comm,dso")
    by_symbol = mine("comm,dso,sym")[:25]
    if not keep:
        data.unlink()
    return {
        "command": " ".join(record),
        "wall_s": measured.wall_s,
        "samples": total,
        "cpu_s_sampled": round(total / PERF_HZ, 2),
        "by_process": [{"process": key, "percent": pct, "cpu_s": round(n / PERF_HZ, 2)}
                       for pct, n, key in by_comm[:8]],
        "process": comm,
        "process_cpu_s": round(own / PERF_HZ, 2),
        "by_shared_object": [{"object": key, "percent": pct, "cpu_s": round(n / PERF_HZ, 2)}
                             for pct, n, key in by_dso[:15]],
        # Stripped libraries: a symbol name here can be the nearest exported one, not the
        # function that ran (libx264's assembly shows as x264_8_trellis_coefn though the
        # preset has trellis=0).
        "by_symbol": [{"symbol": key, "percent": pct} for pct, _, key in by_symbol],
    }


def profile_text(profiles: dict[str, dict[str, Any]]) -> str:
    lines = [f"perf record -e cpu-clock -F {PERF_HZ} -g, self time by shared object", ""]
    for name, profile in profiles.items():
        if "skipped" in profile:
            lines.append(f"{name}: skipped ({profile['skipped']})")
            continue
        lines.append(f"{name}: {profile['cpu_s_sampled']} s CPU sampled, wall "
                     f"{profile['wall_s']} s (under perf)")
        lines += [f"  {r['percent']:6.2f}%  {r['cpu_s']:7.2f} s  process {r['process']}"
                  for r in profile["by_process"]]
        lines.append(f"  {profile['process']} by shared object (% of its samples):")
        lines += [f"  {r['percent']:6.2f}%  {r['cpu_s']:7.2f} s  {r['object']}"
                  for r in profile["by_shared_object"]]
        lines.append(f"  {profile['process']} by symbol (stripped libraries: names approximate):")
        lines += [f"  {r['percent']:6.2f}%  {r['symbol']}" for r in profile["by_symbol"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def _short_object(name: str) -> str:
    return re.sub(r"\.so(\.[\d.]+)?$", "", name)


def object_table(profiles: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Shared objects side by side: CPU seconds in melt and in ffmpeg (by library name)."""
    rows: dict[str, dict[str, Any]] = {}
    for name, profile in profiles.items():
        for row in profile.get("by_shared_object", []):
            key = _short_object(row["object"])
            entry = rows.setdefault(key, {"object": key})
            entry[f"{name}_s"] = row["cpu_s"]
            entry[f"{name}_percent"] = row["percent"]
    return sorted(rows.values(), key=lambda r: -max(r.get("melt_s", 0), r.get("ffmpeg_s", 0)))


# -- the run -----------------------------------------------------------------------------------
def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def summarise(samples: list[Measurement], media_s: float) -> dict[str, Any]:
    wall = _median([s.wall_s for s in samples])
    return {
        "runs": len(samples),
        "wall_s": wall,
        "cpu_s": _median([s.cpu_s for s in samples]),
        "user_s": _median([s.user_s for s in samples]),
        "sys_s": _median([s.sys_s for s in samples]),
        "max_rss_mb": _median([s.max_rss_mb for s in samples]),
        "tree_rss_mb": _median([s.tree_rss_mb for s in samples]),
        "realtime_factor": round(media_s / wall, 2) if wall else None,
        "cpu_s_per_media_s": round(_median([s.cpu_s for s in samples]) / media_s, 3),
        "samples": [s.__dict__ for s in samples],
    }


def print_table(results: dict[str, dict[str, Any]], ratios: dict[str, dict[str, float]]) -> None:
    head = ("| what | runs | wall s | CPU s (user+sys) | peak RSS MB (largest process) "
            "| peak RSS MB (tree, sampled) | real-time factor |")
    print(head)
    print("|" + "---|" * 7)
    for name, row in results.items():
        print(f"| {name} | {row['runs']} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} "
              f"| {row['max_rss_mb']:.0f} | {row['tree_rss_mb']:.0f} "
              f"| {row['realtime_factor']:.2f} |")
    print()
    print("| ratio | wall | CPU | peak RSS (largest process) | peak RSS (tree) |")
    print("|---|---|---|---|---|")
    for name, row in ratios.items():
        print(f"| {name} | {row['wall']:.2f} | {row['cpu']:.2f} | {row['max_rss']:.2f} "
              f"| {row['tree_rss']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="meeting length (> 20)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each contender")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--no-profile", action="store_true", help="skip the perf profile")
    parser.add_argument("--no-snapshot", action="store_true",
                        help="run melter from the working tree instead of a copy taken at start")
    parser.add_argument("--keep", action="store_true",
                        help="keep the outputs, prepared media and perf.data")
    args = parser.parse_args(argv)
    if args.seconds <= 21:
        parser.error("--seconds must be more than 21 (the last participant joins at 20 s)")
    out: Path = args.out.resolve()
    work = out / "render-work"
    work.mkdir(parents=True, exist_ok=True)

    # 1. The meeting.
    folder = out / "render-meeting" / f"{args.seconds:g}s"
    manifest = build_meeting(folder, args.seconds)
    how = "cached" if manifest["cached"] else f"built in {manifest['build_s']} s"
    print(f"meeting: {folder} ({how})", flush=True)

    # melter, from a copy taken now unless --no-snapshot.
    env = dict(os.environ)
    root = REPO
    if not args.no_snapshot:
        root = snapshot_melter(work / "snapshot")
        env["PYTHONPATH"] = str(root)
    sys.path.insert(0, str(root))
    import melter
    from melter.compose import plan_meeting, prepare_media
    from melter.engine.mlt import (
        DocumentOptions,
        build_document,
        melt_binary,
        melt_environment,
    )
    from melter.layout.model import load_layout
    from melter.meeting import discover
    from melter.render import PRESETS, style_of

    assert Path(melter.__file__).resolve().is_relative_to(root.resolve()), melter.__file__
    hash_at_start = source_hash(REPO)
    melter_cli = [sys.executable, "-c",
                  "import sys; sys.argv[0] = 'melter'; from melter.cli import main; main()"]

    meeting = discover([folder])
    layout = load_layout("grid")
    plan, _ = plan_meeting(meeting, layout)
    fps = layout.canvas.fps
    frames = max(1, round(plan.duration_us * fps / 1e6))
    media_s = frames / fps
    colours = {p.uid: p.colour for p in PEOPLE}

    # 2. Fill the prepared-media cache with a cold render, then take the same files.
    media_dir = work / "media"
    if media_dir.exists():
        shutil.rmtree(media_dir)
    outputs = {name: work / f"{name}.mp4" for name in ("melter", "melt", "ffmpeg")}
    render_cmd = [*melter_cli, "render", str(folder), "--layout", "grid",
                  "-o", str(outputs["melter"]), "--workdir", str(media_dir)]
    print("cold melter render (prepares the media) ...", flush=True)
    cold = run_measured(render_cmd, work / "melter-cold.log", env=env)
    if cold.exit_code != 0:
        print((work / "melter-cold.log").read_text()[-3000:], file=sys.stderr)
        return 1
    before = sorted(p.name for p in media_dir.iterdir())
    media = prepare_media(meeting, media_dir, fps)
    after = sorted(p.name for p in media_dir.iterdir())
    if before != after or any(m.path.name not in before for m in media.values()):
        print("prepare_media wrote new files: not the ones melter rendered from",
              file=sys.stderr)
        return 1

    # The MLT document melter renders (for melt alone), the ffmpeg graph, and diagnostics.
    preset = PRESETS["mp4"]
    consumer = ["real_time=-1", *(f"{k}={v}" for k, v in preset.properties.items())]
    scratch = work / "scratch.mp4"

    def melt_for(name: str, the_plan: Any, the_layout: Any, prescale: bool = True,
                 output: Path = scratch) -> list[str]:
        """Write the document melter writes for ``the_plan``; return melt's command for it."""
        # As `melter render` builds it: the whole meeting, its audio mixed in one input.
        options = DocumentOptions(the_layout.canvas.width, the_layout.canvas.height,
                                  style_of(the_layout), prescale=prescale, mix_audio=True)
        built = build_document(the_plan, media, options)
        assert built.frames == frames
        document = work / f"{name}.mlt"
        document.write_text(built.xml)
        return [melt_binary(), "-progress2", str(document), "-consumer", f"avformat:{output}",
                *consumer]

    def ffmpeg_for(name: str, the_plan: Any, labels: bool, output: Path = scratch
                   ) -> tuple[list[str], list[Path], Path, str, dict[str, Any]]:
        """Write the filter script for ``the_plan``; return ffmpeg's command and its parts."""
        inputs, graph, summary = ffmpeg_graph(the_plan, media, frames, layout.labels.size,
                                              labels=labels)
        script = work / f"{name}.txt"
        script.write_text(graph + "\n")
        return ffmpeg_command(inputs, script, output), inputs, script, graph, summary

    melt_cmd = melt_for("melter", plan, layout, output=outputs["melt"])
    ffmpeg_cmd, inputs, script, graph, graph_summary = ffmpeg_for(
        "ffmpeg_filter", plan, True, outputs["ffmpeg"])
    # The same document with MLT scaling every source itself (what preview and chunks use).
    melt_scaling_cmd = melt_for("melter-mlt-scaling", plan, layout, prescale=False)
    # Both without the name labels (what drawing them costs each tool).
    bare = layout.model_copy(update={"labels": layout.labels.model_copy(
        update={"enabled": False})})
    melt_bare_cmd = melt_for("melter-no-labels", plan, bare)
    ffmpeg_bare_cmd = ffmpeg_for("ffmpeg_filter_no_labels", plan, False)[0]
    # The floor: each participant in a fixed quadrant exactly the sources' size, no names, so
    # nothing is scaled. No document melter writes for this meeting does less per frame.
    exact = exact_cells_layout(layout)
    exact_plan, _ = plan_meeting(meeting, exact)
    melt_exact_cmd = melt_for("melter-source-size-cells", exact_plan, exact)
    ffmpeg_exact_cmd = ffmpeg_for("ffmpeg_filter_source_size_cells", exact_plan, False)[0]
    prep_dir = work / "prep-only"
    prep_cmd = [sys.executable, "-c",
                "import sys; from pathlib import Path; from melter.meeting import discover; "
                "from melter.compose import prepare_media; "
                "prepare_media(discover([Path(sys.argv[1])]), Path(sys.argv[2]), 30)",
                str(folder), str(prep_dir)]
    contenders = {
        "melter render": (render_cmd, env),
        "melt alone": (melt_cmd, melt_environment()),
        "ffmpeg": (ffmpeg_cmd, None),
        "melt, MLT scaling": (melt_scaling_cmd, melt_environment()),
        "media preparation": (prep_cmd, env),
        "melt alone, no labels": (melt_bare_cmd, melt_environment()),
        "ffmpeg, no labels": (ffmpeg_bare_cmd, None),
        "melt, source-size cells": (melt_exact_cmd, melt_environment()),
        "ffmpeg, source-size cells": (ffmpeg_exact_cmd, None),
    }

    # 3. Timed runs, in turns; the first contender moves on every round.
    samples: dict[str, list[Measurement]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_number in range(args.runs):
        order = names[round_number % len(names):] + names[: round_number % len(names)]
        for name in order:
            command, child_env = contenders[name]
            if name == "media preparation" and prep_dir.exists():
                shutil.rmtree(prep_dir)
            log = work / f"{re.sub(r'[^a-z]+', '-', name)}-{round_number}.log"
            measured = run_measured(command, log, env=child_env)
            if measured.exit_code != 0:
                print(f"{name} failed (exit {measured.exit_code}); see {log}", file=sys.stderr)
                print(log.read_text()[-3000:], file=sys.stderr)
                return 1
            samples[name].append(measured)
            print(f"  run {round_number + 1}/{args.runs} {name:22s} wall {measured.wall_s:7.2f} s"
                  f"  CPU {measured.cpu_s:7.2f} s  RSS {measured.max_rss_mb:6.0f} MB"
                  f"  tree {measured.tree_rss_mb:6.0f} MB  load {measured.load}", flush=True)
    if prep_dir.exists():
        shutil.rmtree(prep_dir)
    scratch.unlink(missing_ok=True)
    results = {name: summarise(runs, media_s) for name, runs in samples.items()}
    results["melter render, cold (prepares media)"] = summarise([cold], media_s)

    def ratio(a: str, b: str) -> dict[str, float]:
        ra, rb = results[a], results[b]
        return {"wall": round(ra["wall_s"] / rb["wall_s"], 2),
                "cpu": round(ra["cpu_s"] / rb["cpu_s"], 2),
                "max_rss": round(ra["max_rss_mb"] / rb["max_rss_mb"], 2),
                "tree_rss": round(ra["tree_rss_mb"] / rb["tree_rss_mb"], 2)}

    ratios = {"melter render / ffmpeg": ratio("melter render", "ffmpeg"),
              "melt alone / ffmpeg": ratio("melt alone", "ffmpeg"),
              "melter render / melt alone": ratio("melter render", "melt alone"),
              "melt, MLT scaling / ffmpeg": ratio("melt, MLT scaling", "ffmpeg"),
              "melt / ffmpeg, both without labels": ratio("melt alone, no labels",
                                                          "ffmpeg, no labels"),
              "melt, source-size cells / ffmpeg": ratio("melt, source-size cells", "ffmpeg"),
              "melt / ffmpeg, both source-size cells": ratio("melt, source-size cells",
                                                             "ffmpeg, source-size cells")}

    # 4. Equal work?
    mids = [round((s.start_us + s.end_us) / 2e6, 2) for s in plan.scenes]
    instants = sorted({*mids, round(media_s - 1.0, 2)})
    checks = {name: probe_output(path, plan, colours, instants) for name, path in outputs.items()}
    checks["difference melter vs ffmpeg (mean |RGB|)"] = picture_difference(
        checks["melter"], checks["ffmpeg"])
    checks["difference melter vs melt alone (mean |RGB|)"] = picture_difference(
        checks["melter"], checks["melt"])
    for name in outputs:
        checks[name].pop("_pictures")

    # 5. Profile.
    profile: dict[str, Any] = {"skipped": "--no-profile"}
    if not args.no_profile and shutil.which("perf") is None:
        profile = {"skipped": "perf is not installed (apt-get install -y linux-perf)"}
    elif not args.no_profile:
        print("perf profiles: one melter render, one ffmpeg run ...", flush=True)
        perf_out = work / "perf-melter.mp4"
        perf_cmd = [*melter_cli, "render", str(folder), "--layout", "grid",
                    "-o", str(perf_out), "--workdir", str(media_dir)]
        profiles = {"melt": perf_profile("melter", perf_cmd, env, work, "melt", args.keep)}
        perf_out.unlink(missing_ok=True)
        perf_ffmpeg = ffmpeg_command(inputs, script, perf_out)
        profiles["ffmpeg"] = perf_profile("ffmpeg", perf_ffmpeg, None, work, "ffmpeg",
                                          args.keep)
        perf_out.unlink(missing_ok=True)
        (out / "render_profile.txt").write_text(profile_text(profiles))
        profile = {**profiles, "objects": object_table(profiles)}

    hash_at_end = source_hash(REPO)
    report = {
        "taken": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "meeting": {
            "folder": str(folder), "seconds": args.seconds, "frames": frames,
            "media_s": media_s, "participants": [p.__dict__ for p in PEOPLE],
            "video": f"{VIDEO_SIZE[0]}x{VIDEO_SIZE[1]} {VIDEO_FPS} fps VP8 ~{VIDEO_KBPS} kb/s, "
                     f"key frame every {VIDEO_GOP} frames; Opus 20 ms mono tones",
            "files": manifest["files"], "built_s": manifest.get("build_s"),
        },
        "plan": plan.to_json()["scenes"],
        "commands": {
            "melter render": " ".join(render_cmd),
            "melt alone": " ".join(melt_cmd),
            "ffmpeg": " ".join(ffmpeg_cmd),
            "ffmpeg filter_complex": graph,
            "ffmpeg graph": graph_summary,
            "media preparation": " ".join(prep_cmd),
            "melt alone, no labels": " ".join(melt_bare_cmd),
            "melt, MLT scaling": " ".join(melt_scaling_cmd),
            "ffmpeg, no labels": " ".join(ffmpeg_bare_cmd),
            "melt, source-size cells": " ".join(melt_exact_cmd),
            "ffmpeg, source-size cells": " ".join(ffmpeg_exact_cmd),
        },
        "results": results,
        "ratios": ratios,
        "checks": checks,
        "profile": profile,
        "environment": {
            "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "cpu": _cpu_model(),
            "melt": tool_version(["melt", "--version"]),
            "ffmpeg": tool_version(["ffmpeg", "-hide_banner", "-version"]),
            "load_at_end": load_average(),
            "melter": {**git_state(), "source_hash": hash_at_start,
                       "snapshot": not args.no_snapshot,
                       "changed_during_run": hash_at_start != hash_at_end},
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "render_bench.json").write_text(json.dumps(report, indent=1, default=str) + "\n")

    print()
    print(f"meeting {media_s:g} s, {frames} frames at {fps} fps, 1280x720; medians of "
          f"{args.runs} runs")
    print_table(results, ratios)
    print()
    print("| output | frames | video s | audio s | container s | worst tile-centre error |")
    print("|---|---|---|---|---|---|")
    for name in outputs:
        c = checks[name]
        print(f"| {name} | {c['frames']} | {c['video_s']} | {c['audio_s']} "
              f"| {c['container_s']} | {c['tile_max_error']} |")
    for name in outputs:
        if checks[name]["frames"] != frames or checks[name]["tile_max_error"] > 30:
            print(f"warning: {name}'s output is not the planned work ({frames} frames, "
                  "tile colours within 30 levels)")
    print("audio RMS per scene (melter / ffmpeg / tones):",
          ", ".join(f"{m['from_s']:g}-{m['to_s']:g} s {m['rms']:.3f}/{f['rms']:.3f}/"
                    f"{m['tones_rms']:.3f}" for m, f in zip(checks["melter"]["audio_rms"],
                                                            checks["ffmpeg"]["audio_rms"],
                                                            strict=True)))
    print("picture difference melter vs ffmpeg (mean |RGB| at instants):",
          checks["difference melter vs ffmpeg (mean |RGB|)"])
    if "objects" in profile:
        print()
        melt_p, ffmpeg_p = profile["melt"], profile["ffmpeg"]
        print(f"perf (self time by shared object): melt {melt_p.get('process_cpu_s')} s CPU "
              f"of {melt_p.get('cpu_s_sampled')} s sampled in the melter render; ffmpeg "
              f"{ffmpeg_p.get('process_cpu_s')} s")
        print("| shared object | melt s | melt % | ffmpeg s | ffmpeg % |")
        print("|---|---|---|---|---|")
        for row in profile["objects"][:12]:
            print(f"| {row['object']} | {row.get('melt_s', 0):.2f} "
                  f"| {row.get('melt_percent', 0):.1f} | {row.get('ffmpeg_s', 0):.2f} "
                  f"| {row.get('ffmpeg_percent', 0):.1f} |")
        print("melter render by process:", "; ".join(
            f"{r['process']} {r['percent']}% ({r['cpu_s']} s)" for r in melt_p["by_process"]))
    elif profile.get("skipped"):
        print(f"profile skipped: {profile['skipped']}")
    if hash_at_start != hash_at_end:
        print("note: melter's sources changed during the run"
              + ("" if not args.no_snapshot else " (and were measured as they changed)"))
    if not args.keep:
        for path in outputs.values():
            path.unlink(missing_ok=True)
        shutil.rmtree(media_dir, ignore_errors=True)
    print(f"\nwrote {out / 'render_bench.json'}")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
