"""Render a meeting: discover, plan, prepare media, write the MLT document, run melt, check.

This is the one library call the CLI's ``render`` and ``preview``, the farm's workers and the
API all use.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import av

from melter.compose import plan_meeting, prepare_media
from melter.convert import atomic_output
from melter.engine.mlt import Output, RenderError, build_document, run_melt
from melter.errors import MelterError
from melter.layout.model import Layout
from melter.meeting import Meeting
from melter.plan import Plan


@dataclass(frozen=True)
class Preset:
    name: str
    suffix: str
    width: int | None
    height: int | None
    properties: dict[str, str]
    audio_only: bool = False
    description: str = ""


_X264 = {"vcodec": "libx264", "preset": "veryfast", "crf": "23", "pix_fmt": "yuv420p",
         "g": "60", "acodec": "aac", "ab": "128k", "frequency": "48000", "channels": "2"}
PRESETS: dict[str, Preset] = {
    "mp4": Preset("mp4", ".mp4", None, None, {"f": "mp4", "movflags": "+faststart", **_X264},
                  description="H.264/AAC MP4 at the layout's canvas (default 1280x720 30 fps)"),
    "720p": Preset("720p", ".mp4", 1280, 720, {"f": "mp4", "movflags": "+faststart", **_X264},
                   description="H.264/AAC MP4 1280x720"),
    "1080p": Preset("1080p", ".mp4", 1920, 1080, {"f": "mp4", "movflags": "+faststart", **_X264},
                    description="H.264/AAC MP4 1920x1080"),
    "4k": Preset("4k", ".mp4", 3840, 2160,
                 {"f": "mp4", "movflags": "+faststart", **_X264, "preset": "superfast"},
                 description="H.264/AAC MP4 3840x2160"),
    "webm": Preset("webm", ".webm", None, None,
                   {"f": "webm", "vcodec": "libvpx-vp9", "crf": "33", "vb": "0",
                    "deadline": "realtime", "cpu-used": "8", "row-mt": "1", "g": "60",
                    "pix_fmt": "yuv420p", "acodec": "libopus", "ab": "96k",
                    "frequency": "48000", "channels": "2"},
                   description="VP9/Opus WebM"),
    "m4a": Preset("m4a", ".m4a", None, None,
                  {"f": "ipod", "vn": "1", "acodec": "aac", "ab": "128k", "frequency": "48000",
                   "channels": "2"}, audio_only=True, description="audio only, AAC in M4A"),
    "opus": Preset("opus", ".opus", None, None,
                   {"f": "opus", "vn": "1", "acodec": "libopus", "ab": "64k",
                    "frequency": "48000", "channels": "2"},
                   audio_only=True, description="audio only, Opus"),
}


def preset_for(path: Path, name: str | None) -> Preset:
    if name is not None:
        if name not in PRESETS:
            raise MelterError(f"unknown preset {name!r} (presets: {', '.join(PRESETS)})")
        return PRESETS[name]
    by_suffix = {".mp4": "mp4", ".webm": "webm", ".m4a": "m4a", ".opus": "opus", ".ogg": "opus"}
    suffix = path.suffix.lower()
    if suffix not in by_suffix:
        raise MelterError(f"{path}: cannot tell the preset from {suffix!r}; give --preset")
    return PRESETS[by_suffix[suffix]]


@dataclass
class RenderResult:
    outputs: list[Path]
    plan: Plan
    duration_s: float
    warnings: list[str] = field(default_factory=list)


def trim_spans(plan: Plan) -> list[tuple[int, int]]:
    """Frame spans that have media (``--trim`` drops the stretches where nobody is present)."""
    spans: list[tuple[int, int]] = []
    fps = plan.fps
    for scene in plan.scenes:
        if not scene.placements and not scene.audio:
            continue
        first = round(scene.start_us * fps / 1e6)
        last = round(scene.end_us * fps / 1e6) - 1
        if spans and spans[-1][1] + 1 >= first:
            spans[-1] = (spans[-1][0], last)
        elif last >= first:
            spans.append((first, last))
    return spans


def _document_text(plan: Plan, media: dict, layout: Layout, width: int, height: int,
                   audio_only: bool, trim: bool,
                   window: tuple[int, int] | None = None,
                   prescale: bool = True) -> tuple[str, int]:
    """The MLT document of a render, and its frame count. ``window``: only those frames
    (first, last) will be rendered, with melt's ``in`` and ``out`` (frames of the trimmed
    timeline when ``trim``). ``prescale=False`` leaves scaling to MLT (to compare the two)."""
    spans = trim_spans(plan) if trim else []
    if window is not None and trim:
        window = (_untrimmed(window[0], spans), _untrimmed(window[1], spans))
    document = build_document(
        plan, media, width, height,
        labels=layout.labels.enabled,
        placeholder_text=layout.placeholder.text,
        placeholder_color=layout.placeholder.color,
        label_size=layout.labels.size,
        label_color=layout.labels.color,
        label_background=layout.labels.background,
        placeholder_text_color=layout.placeholder.text_color,
        font=layout.labels.font,
        background_image=layout.canvas.background_image,
        audio_only=audio_only,
        prescale=prescale,
        window=window,
        # A trimmed render jumps over the stretches where nobody is present.
        mix_audio=window is None and not trim,
    )
    xml, frames = document.xml, document.frames
    if trim:
        entries = "".join(
            f'  <entry producer="main" in="{a}" out="{b}"/>\n' for a, b in spans
        )
        xml = xml.replace("</mlt>", f'<playlist id="trimmed">\n{entries}</playlist>\n</mlt>')
        xml = xml.replace('producer="main">', 'producer="trimmed">', 1)
        frames = sum(b - a + 1 for a, b in spans)
    return xml, frames


def _untrimmed(frame: int, spans: list[tuple[int, int]]) -> int:
    """The meeting's frame that frame ``frame`` of the trimmed timeline shows."""
    for first, last in spans:
        if frame <= last - first:
            return first + frame
        frame -= last - first + 1
    return spans[-1][1] if spans else frame


def render(
    meeting: Meeting,
    layout: Layout,
    outputs: list[tuple[Path, Preset]],
    workdir: Path | None = None,
    trim: bool = False,
    progress: Callable[[int, int], None] | None = None,
    layouts: dict[str, Layout] | None = None,
) -> RenderResult:
    """Render ``meeting`` by ``layout`` into each output (one melt run per rendition);
    ``layouts``: its rule layouts, when the caller resolved them (as for ``plan_meeting``)."""
    plan, _ = plan_meeting(meeting, layout, layouts)
    fps = layout.canvas.fps
    with tempfile.TemporaryDirectory(prefix="melter-") as scratch:
        media_dir = workdir or Path(scratch) / "media"
        media = prepare_media(meeting, media_dir, fps)
        written: list[Path] = []
        for path, preset in outputs:
            width = preset.width or layout.canvas.width
            height = preset.height or layout.canvas.height
            xml, frames = _document_text(plan, media, layout, width, height, preset.audio_only,
                                         trim)
            document = Path(scratch) / f"{path.stem}.mlt"
            document.write_text(xml)
            with atomic_output(path) as temp:
                # One render thread: on a small machine a second costs more than it gains.
                consumer = ["-consumer", f"avformat:{temp}", "real_time=-1",
                            *(f"{k}={v}" for k, v in preset.properties.items())]
                run_melt(document, consumer, frames, progress)
                check_output(temp, frames / fps, preset.audio_only)
            written.append(path)
    return RenderResult(written, plan, round(plan.duration_us / 1e6, 3), list(plan.warnings))


def check_output(path: Path, expected_s: float, audio_only: bool) -> None:
    """melt can exit 0 with a wrong file: make sure the streams and length are there."""
    try:
        with av.open(str(path)) as container:
            has_video = bool(container.streams.video)
            has_audio = bool(container.streams.audio)
            duration = (container.duration or 0) / 1e6
    except (av.error.FFmpegError, OSError) as exc:
        raise RenderError(f"melt wrote no readable output ({exc})") from None
    if not has_audio or (not audio_only and not has_video):
        raise RenderError(f"melt's output lacks {'audio' if not has_audio else 'video'}")
    if not math.isclose(duration, expected_s, abs_tol=max(0.2, expected_s * 0.01)):
        raise RenderError(f"melt's output lasts {duration:.2f} s instead of {expected_s:.2f} s")


def preview(
    meeting: Meeting, layout: Layout, at_s: float, output: Path, workdir: Path | None = None
) -> Plan:
    """One frame of the composition at ``at_s`` seconds, as a PNG."""
    plan, _ = plan_meeting(meeting, layout)
    fps = layout.canvas.fps
    frame = min(max(0, round(at_s * fps)), max(0, round(plan.duration_us * fps / 1e6) - 1))
    with tempfile.TemporaryDirectory(prefix="melter-") as scratch:
        media = prepare_media(meeting, workdir or Path(scratch) / "media", fps)
        xml, _ = _document_text(plan, media, layout, layout.canvas.width, layout.canvas.height,
                                False, False, window=(frame, frame))
        document = Path(scratch) / "preview.mlt"
        document.write_text(xml)
        with atomic_output(output) as temp:
            image = temp.with_suffix(".png")
            consumer = ["-consumer", f"avformat:{image}", "f=image2", "vcodec=png",
                        "update=1", "an=1"]
            run_melt(document, consumer, 1, extra=[f"in={frame}", f"out={frame}"])
            if not image.exists():
                raise RenderError("melt wrote no preview frame")
            image.replace(temp)
    return plan


__all__ = ["PRESETS", "Output", "RenderResult", "preview", "render"]
