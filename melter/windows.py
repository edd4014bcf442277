"""A long meeting rendered in windows and joined, as the farm renders it, on one machine.

melt visits every transition of its document on every frame it renders, shown or not, and a
meeting's transitions grow with its scenes: a single document of a one-hour meeting where
people come and go renders several times slower per frame than one of its first minutes.
A window's document holds only the scenes it overlaps (:func:`melter.render.render` with
``frames``), so a meeting rendered window by window costs the same per minute however long
it is, and the windows can run side by side on a machine's cores.

The windows join as the farm's chunks do: the video without re-encoding (each window starts
on a key frame), the sound from AAC pieces whose packets join by copying
(:mod:`melter.splice`), or for other codecs from PCM pieces encoded once at the join. The
result is the single document's, frame for frame and sample for sample.
"""

from __future__ import annotations

import math
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import av

from melter.compose import prepare_media
from melter.convert import atomic_output
from melter.engine.mlt import RenderError
from melter.hls import atomic_playlist
from melter.render import (
    PCM,
    Preset,
    RenderPlan,
    RenderResult,
    audio_piece,
    check_output,
    render,
    render_audio_piece,
)
from melter.splice import join_pieces

#: Seconds of meeting per window of a local render: long enough that a window's fixed costs
#: (melt's start, the AAC pieces' run-in) stay small, short enough that its document holds
#: few scenes. A meeting shorter than two windows is rendered as one document.
WINDOW_SECONDS = 60.0
#: A window's sound costs about a quarter of its pictures (for progress).
AUDIO_WEIGHT = 0.25


def plan_chunks(plan: Any, frames: int, fps: int, seconds: float,
                scene_cuts: bool = True) -> list[tuple[int, int]]:
    """Frame ranges (first, last) of about ``seconds`` each, cut at scene boundaries when one
    lies within a quarter chunk of the ideal cut."""
    target = max(1, round(seconds * fps))
    candidates = sorted({round(scene.start_us * fps / 1e6) for scene in plan.scenes}
                        if scene_cuts else set())
    cuts = [0]
    while frames - cuts[-1] > target * 1.5:
        ideal = cuts[-1] + target
        window = [c for c in candidates
                  if abs(c - ideal) <= target // 4 and c > cuts[-1] + fps and c < frames - fps]
        cuts.append(min(window, key=lambda c: (abs(c - ideal), c)) if window else ideal)
    cuts.append(frames)
    return [(a, b - 1) for a, b in pairwise(cuts)]


def window_ranges(planned: RenderPlan, preset: Preset, seconds: float) -> list[tuple[int, int]]:
    """The windows (first, last frame) of ``preset``'s render of a planned meeting."""
    step, scene_cuts = seconds, not planned.trim
    if preset.keyframe_seconds:
        # A window starts on a key frame of its own: cut only where the fixed GOP has one,
        # so that every key frame of the joined file stays on the GOP's grid.
        step = math.ceil(seconds / preset.keyframe_seconds) * preset.keyframe_seconds
        scene_cuts = False
    return plan_chunks(planned.plan, planned.frames, planned.fps, step, scene_cuts=scene_cuts)


def count_video_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def run_tool(command: list[str]) -> None:
    """Run an FFmpeg command; its last words on failure."""
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, check=False)
    except OSError as exc:
        raise RenderError(f"{command[0]} could not start: {exc}") from None
    if done.returncode != 0:
        detail = "; ".join(done.stderr.strip().splitlines()[-3:]) or f"exit code {done.returncode}"
        raise RenderError(f"{command[0]} failed: {detail}")


def concat_list(files: Iterable[str]) -> str:
    """A listing for FFmpeg's concat demuxer."""
    return "".join("file '" + name.replace("'", "'\\''") + "'\n" for name in files)


def audio_encoder(preset: Preset) -> list[str]:
    """FFmpeg's options encoding joined PCM as ``preset``'s melt consumer would."""
    names = {"acodec": "-c:a", "ab": "-b:a", "frequency": "-ar", "channels": "-ac"}
    return [option for key, flag in names.items() if key in preset.properties
            for option in (flag, preset.properties[key])]


def join_parts(videos: Sequence[Path], sounds: Sequence[Path], target: Path, preset: Preset,
               scratch: Path, *, frames: int, fps: int,
               run: Callable[[list[str]], None] = run_tool,
               check: Callable[[], None] = lambda: None) -> None:
    """Join windows' videos and sound pieces (in order) into ``target`` in ``preset``'s
    container (its :attr:`Preset.parts`), copying the video, and make sure it holds both
    streams, ``frames`` frames and their length at ``fps``; ``scratch`` holds the listings.
    ``run`` runs each FFmpeg command; ``check`` is called between the steps (the farm stops
    an attempt that lost its lease there)."""
    _join(videos, sounds, target, preset, scratch, run, check)
    check()
    check_output(target, frames / fps, False)
    held = count_video_frames(target)
    if held != frames:
        raise RenderError(f"joined video has {held} frames, not {frames}")


def _join(videos: Sequence[Path], sounds: Sequence[Path], target: Path, preset: Preset,
          scratch: Path, run: Callable[[list[str]], None], check: Callable[[], None]) -> None:
    fmt = preset.properties.get("f", "mp4")
    faststart = ["-movflags", "+faststart"] if fmt in ("mp4", "mov", "ipod") else []
    listing, listed_sounds = scratch / "chunks.txt", scratch / "audio.txt"
    listing.write_text(concat_list(str(path) for path in videos))
    concat = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
    if all(piece.suffix == PCM.suffix for piece in sounds):
        # PCM pieces (codecs other than AAC): encoded here, at once.
        listed_sounds.write_text(concat_list(str(piece) for piece in sounds))
        run([*concat, "-f", "concat", "-safe", "0", "-i", str(listing),
             "-f", "concat", "-safe", "0", "-i", str(listed_sounds),
             "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy",
             *audio_encoder(preset), *faststart, "-f", fmt, str(target)])
        return
    # AAC pieces: the videos end to end, then both streams' packets copied.
    video = scratch / f"video{target.suffix}"
    run([*concat, "-f", "concat", "-safe", "0", "-i", str(listing), "-map", "0:v:0",
         "-c", "copy", "-f", fmt, str(video)])
    check()
    join_pieces(video, sounds, target, fmt,
                options={"movflags": "+faststart"} if faststart else None)
    video.unlink()


def default_jobs() -> int:
    """Windows rendered at once by default: one per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def windowed(planned: RenderPlan, preset: Preset, seconds: float) -> bool:
    """Whether ``preset``'s render of the meeting goes window by window."""
    return (seconds > 0 and not preset.still and not preset.audio_only
            and planned.frames >= 2 * seconds * planned.fps)


class _Stopped(Exception):
    """Another window failed (or the render was interrupted): this one stops its melt."""


@dataclass
class _Progress:
    """The frames done across windows rendered side by side, reported as one count."""

    total: int
    report: Callable[[int, int], None] | None
    stop: threading.Event

    def __post_init__(self) -> None:
        self._done: dict[str, float] = {}
        self._lock = threading.Lock()

    def unit(self, name: str, weight: float) -> Callable[[int, int], None]:
        def progress(frame: int, frames: int) -> None:
            if self.stop.is_set():
                raise _Stopped
            with self._lock:
                self._done[name] = frame * weight
                done = round(sum(self._done.values()))
            if self.report is not None:
                self.report(min(done, self.total), self.total)
        return progress


def render_windows(planned: RenderPlan, path: Path, preset: Preset, *,
                   seconds: float = WINDOW_SECONDS, jobs: int = 1, workdir: Path,
                   progress: Callable[[int, int], None] | None = None,
                   stage: Callable[[str], None] | None = None) -> int:
    """Render ``preset``'s output of a planned meeting into ``path`` window by window,
    ``jobs`` windows at once, and join them; the frames it holds."""
    parts = preset.parts
    ranges = window_ranges(planned, preset, seconds)
    frames = planned.frames
    stop = threading.Event()
    counter = _Progress(round(frames * (1 + AUDIO_WEIGHT)), progress, stop)
    if stage is not None:
        stage("preparing media")
    # Once, before windows run side by side: each window's render then finds them prepared.
    prepare_media(planned.meeting, workdir, planned.fps)
    if stage is not None:
        stage("rendering")
    # The windows' files lie beside the output (on its disk, which has room for it).
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".melter-windows-", dir=path.parent) as folder:
        scratch = Path(os.path.abspath(folder))
        videos = [scratch / f"v{i}{parts.suffix}" for i in range(len(ranges))]
        sounds = [scratch / f"a{i}{audio_piece(planned, parts, chunk).suffix}"
                  for i, chunk in enumerate(ranges)]

        def video(i: int) -> None:
            first, last = ranges[i]
            render(planned, [(videos[i], parts)], frames=(first, last), audio=False,
                   workdir=workdir, progress=counter.unit(f"v{i}", 1.0))
            held = count_video_frames(videos[i])
            if held != last - first + 1:
                raise RenderError(f"window {i} (frames {first}-{last}) has {held} frames, "
                                  f"not {last - first + 1}")

        def sound(i: int) -> None:
            render_audio_piece(planned, parts, ranges[i], sounds[i], workdir=workdir,
                               progress=counter.unit(f"a{i}", AUDIO_WEIGHT))

        units = [partial(work, i) for i in range(len(ranges)) for work in (video, sound)]
        _run_all(units, jobs, stop)
        if stage is not None:
            stage("joining")
        target = (atomic_playlist(path, preset.keyframe_seconds or 6) if preset.hls
                  else atomic_output(path))
        with target as temp:
            joined = temp if not preset.hls else scratch / f"joined{parts.suffix}"
            join_parts(videos, sounds, joined, parts, scratch, frames=frames, fps=planned.fps)
            if preset.hls:
                os.replace(joined, temp)
    return frames


def _run_all(units: Sequence[Callable[[], None]], jobs: int, stop: threading.Event) -> None:
    """Run every unit, ``jobs`` at once; the first failure stops the others (each stops its
    melt at its next frame) and is raised."""
    if jobs <= 1:
        for unit in units:
            unit()
        return
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="melter-window") as pool:
        futures: list[Future[None]] = [pool.submit(unit) for unit in units]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()
        except BaseException:
            stop.set()
            for future in futures:
                future.cancel()
            wait(futures)
            failures = [f.exception() for f in futures
                        if f.done() and not f.cancelled() and f.exception() is not None]
            real = [e for e in failures if not isinstance(e, _Stopped)]
            if real and isinstance(real[0], Exception):
                raise real[0] from None
            raise


def render_meeting(planned: RenderPlan, outputs: Sequence[tuple[Path, Preset]], *,
                   window_seconds: float = WINDOW_SECONDS, jobs: int | None = None,
                   workdir: Path | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   stage: Callable[[str], None] | None = None) -> RenderResult:
    """Render a planned meeting into each output: window by window (:func:`render_windows`,
    ``jobs`` windows at once, default one per core) when it lasts at least two windows of
    ``window_seconds`` (0: never), otherwise as one document (:func:`melter.render.render`)."""
    jobs = default_jobs() if jobs is None else max(1, jobs)
    if not any(windowed(planned, preset, window_seconds) for _, preset in outputs):
        return render(planned, outputs, workdir=workdir, progress=progress, stage=stage)
    written: list[Path] = []
    count = 0
    with tempfile.TemporaryDirectory(prefix="melter-") as scratch:
        media = workdir or Path(scratch) / "media"
        for path, preset in outputs:
            if windowed(planned, preset, window_seconds):
                count = render_windows(planned, path, preset, seconds=window_seconds,
                                       jobs=jobs, workdir=media, progress=progress,
                                       stage=stage)
            else:
                count = render(planned, [(path, preset)], workdir=media, progress=progress,
                               stage=stage).frames
            written.append(path)
    plan = planned.plan
    return RenderResult(written, plan, planned.duration_s, list(plan.warnings), count)


__all__ = ["AUDIO_WEIGHT", "WINDOW_SECONDS", "audio_encoder", "concat_list",
           "count_video_frames", "default_jobs", "join_parts", "plan_chunks", "render_meeting",
           "render_windows", "run_tool", "window_ranges", "windowed"]
