"""Render a meeting: the one way in for the CLI's ``render``, ``preview`` and ``plan``, the
farm's units and (through the farm) the API.

Two steps, so that a render split over processes does the expensive part once:

* :func:`plan_render` discovers and analyses the recordings and plans the scenes. Its
  :class:`RenderPlan` is plain data: :meth:`RenderPlan.to_json` stores it and
  :meth:`RenderPlan.from_json` reads it back (the farm plans a job once; its units read that).
* :func:`render` prepares the media, builds the MLT document of the plan and runs melt, for the
  whole meeting or a range of its frames, with both streams or either.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import av

from melter import __version__
from melter.compose import PreparedSegment, plan_meeting, prepare_media
from melter.convert import atomic_output
from melter.engine.mlt import (
    MIX_RATE,
    Document,
    DocumentOptions,
    Output,
    RenderError,
    Style,
    build_document,
    colorspace_of,
    graph_path,
    run_melt,
    trim_spans,
)
from melter.errors import MelterError
from melter.hls import atomic_playlist
from melter.layout.model import Layout
from melter.meeting import Meeting, discover
from melter.plan import Plan, SpeakerChange
from melter.splice import CONTEXT, FRAME, RUN_IN, Stretch, encode_stretch, on_grid
from melter.typedjson import dump, load, shape


@dataclass(frozen=True)
class Preset:
    name: str
    suffix: str
    width: int | None
    height: int | None
    properties: dict[str, str]
    audio_only: bool = False
    description: str = ""
    #: One picture, not a stream (``render`` with ``frames=(n, n)``).
    still: bool = False
    #: Key frames exactly this many seconds apart and nowhere else (no scene-cut key frames),
    #: so the video can be cut there without re-encoding.
    keyframe_seconds: int | None = None
    #: An HLS playlist of MPEG-TS segments of ``keyframe_seconds`` each, cut without
    #: re-encoding from the MP4 the properties describe (see :mod:`melter.hls`).
    hls: bool = False

    def encoder_properties(self, fps: int) -> dict[str, str]:
        """The consumer's properties at ``fps`` (the GOP of ``keyframe_seconds`` is in frames)."""
        if self.keyframe_seconds is None:
            return self.properties
        gop = str(self.keyframe_seconds * fps)
        return {**self.properties, "g": gop, "keyint_min": gop, "sc_threshold": "0"}

    @property
    def parts(self) -> Preset:
        """What the farm renders this preset's chunks and join as: the preset
        itself, or for HLS the MP4 its segments are cut from (same key frames)."""
        return replace(self, suffix=".mp4", hls=False) if self.hls else self


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
    "hls": Preset("hls", ".m3u8", None, None, {"f": "mp4", **_X264},
                  description="HLS (VOD): H.264/AAC MPEG-TS segments of 6 s beside an .m3u8 "
                  "playlist", keyframe_seconds=6, hls=True),
}


#: A stretch of a meeting's audio as 16-bit PCM at the mix's rate (what the farm renders each
#: chunk's audio as; the join encodes the pieces once).
PCM = Preset("pcm", ".wav", None, None,
             {"f": "wav", "vn": "1", "acodec": "pcm_s16le", "frequency": str(MIX_RATE),
              "channels": "2"}, audio_only=True, description="audio only, 16-bit PCM WAV")


#: The meeting's mix exactly as rendered, for transcription or for mastering elsewhere.
PRESETS["wav"] = replace(PCM, name="wav", description="audio only, 16-bit PCM WAV (lossless)")


def pcm_samples(frames: int, fps: int) -> int:
    """Samples per channel in the first ``frames`` frames at ``fps`` (as the mix counts)."""
    return round(frames * MIX_RATE / fps)


#: One composed frame as a PNG (what ``melter preview`` writes).
STILL = Preset("png", ".png", None, None,
               {"f": "image2", "vcodec": "png", "update": "1", "an": "1"},
               description="one frame as a PNG", still=True)


def preset_for(path: Path, name: str | None) -> Preset:
    if name is not None:
        if name not in PRESETS:
            raise MelterError(f"unknown preset {name!r} (presets: {', '.join(PRESETS)})")
        preset = PRESETS[name]
        if preset.hls != (path.suffix.lower() == ".m3u8"):
            # The name is the playlist's (its segments are named after it), and only a playlist
            # is called .m3u8.
            raise MelterError(f"{path}: the hls preset writes a playlist named *.m3u8, and "
                              "only it does")
        return preset
    by_suffix = {".mp4": "mp4", ".webm": "webm", ".m4a": "m4a", ".opus": "opus", ".ogg": "opus",
                 ".wav": "wav", ".m3u8": "hls"}
    suffix = path.suffix.lower()
    if suffix not in by_suffix:
        raise MelterError(f"{path}: cannot tell the preset from {suffix!r}; give --preset")
    return PRESETS[by_suffix[suffix]]


@dataclass(frozen=True)
class RenderOptions:
    """What a render plan depends on besides the recordings and the layout.

    ``room`` and ``root`` apply when :func:`plan_render` discovers the meeting itself: one
    room among the recordings, and the folder the recordings must lie in (links out of it are
    skipped).
    """

    trim: bool = False
    room: str | None = None
    root: Path | None = None


#: Changes whenever the stored form of a render plan changes meaning without changing shape
#: (a change of shape is caught by :func:`melter.typedjson.shape`).
PLAN_FORMAT = 1


class StalePlan(ValueError):
    """Stored data that is not a render plan this version of melter can use."""


@dataclass
class RenderPlan:
    """A meeting planned for rendering: everything a render needs except the media files.

    Computing it reads every recording (analysis, and the speaker levels when the layout has a
    speaker region); all of it is plain data, so one process can plan and others render.
    """

    #: The meeting as discovered and analysed.
    meeting: Meeting
    #: The scenes: who sits where during which interval.
    plan: Plan
    #: The active-speaker timeline the plan was made from.
    speakers: list[SpeakerChange]
    #: How the layout draws names, cards and the background.
    style: Style
    #: The layout document the plan was made by (as parsed), for records such as manifests.
    layout: dict[str, Any]
    #: Whether the rendered timeline leaves out the stretches where nobody is present.
    trim: bool = False
    #: Size and modification time (ns) of each recording when it was analysed, by path.
    recordings: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def fps(self) -> int:
        return self.plan.fps

    @property
    def frames(self) -> int:
        """Frames of the rendered timeline (the trimmed one with ``trim``)."""
        if self.trim:
            return sum(last - first + 1 for first, last in trim_spans(self.plan))
        return max(1, round(self.plan.duration_us * self.fps / 1e6))

    @property
    def duration_s(self) -> float:
        """The meeting's length (seconds, untrimmed)."""
        return round(self.plan.duration_us / 1e6, 3)

    def frame_at(self, seconds: float) -> int:
        """The meeting's frame at ``seconds``, within the meeting."""
        last = max(0, round(self.plan.duration_us * self.fps / 1e6) - 1)
        return min(max(0, round(seconds * self.fps)), last)

    def document_options(self, width: int | None = None, height: int | None = None, *,
                         audio_only: bool = False, window: tuple[int, int] | None = None,
                         prescale: bool = True) -> DocumentOptions:
        """The options of this plan's MLT document (at the canvas size unless given)."""
        return DocumentOptions(
            width or self.plan.width, height or self.plan.height, self.style,
            audio_only=audio_only, prescale=prescale,
            # A trimmed render jumps over the stretches where nobody is present.
            mix_audio=not self.trim,
            window=window, trim=self.trim)

    @property
    def recording_paths(self) -> list[Path]:
        return [track.path for participant in self.meeting.participants
                for segment in participant.segments for track in segment.tracks]

    def unchanged(self) -> bool:
        """Whether every recording is still as it was analysed (same size and time)."""
        return _recordings(self.recording_paths) == self.recordings

    def only_grown(self) -> bool:
        """Whether every recording is as it was analysed or longer, and each is read no
        further than it was analysed (the compiled pass, :attr:`TrackAnalysis.compiled_end`):
        the plan of recordings still being written holds for all it planned."""
        tracks = [track for participant in self.meeting.participants
                  for segment in participant.segments for track in segment.tracks]
        now = _recordings(self.recording_paths)
        return (all(track.compiled_end is not None for track in tracks)
                and now.keys() == self.recordings.keys()
                and all(now[path][0] >= size for path, (size, _) in self.recordings.items()))

    def to_json(self) -> bytes:
        """The stored form: JSON, stamped with the format, melter's version and the shape."""
        stored = {"format": PLAN_FORMAT, "melter": __version__, "shape": shape(RenderPlan),
                  "plan": dump(self, RenderPlan)}
        return json.dumps(stored, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> RenderPlan:
        """A plan from :meth:`to_json`; :class:`StalePlan` when it was written by another
        version of melter or is not a plan at all."""
        try:
            stored = json.loads(data)
        except ValueError as exc:
            raise StalePlan(f"not JSON: {exc}") from None
        stamp = {"format": PLAN_FORMAT, "melter": __version__, "shape": shape(RenderPlan)}
        if not isinstance(stored, dict) or any(stored.get(k) != v for k, v in stamp.items()):
            raise StalePlan("written by another version of melter")
        try:
            plan = load(stored.get("plan"), RenderPlan)
        except ValueError as exc:
            raise StalePlan(str(exc)) from None
        assert isinstance(plan, RenderPlan)
        return plan


def _recordings(paths: Sequence[Path]) -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            continue
        found[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return found


def style_of(layout: Layout) -> Style:
    """What a document needs of ``layout`` to draw a plan made by it."""
    return Style(
        labels=layout.labels.enabled,
        label_size=layout.labels.size,
        label_color=layout.labels.color,
        label_background=layout.labels.background,
        font=layout.labels.font,
        placeholder_text=layout.placeholder.text,
        placeholder_color=layout.placeholder.color,
        placeholder_text_color=layout.placeholder.text_color,
        background_image=layout.canvas.background_image,
    )


def plan_render(source: Meeting | Sequence[Path], layout: Layout,
                options: RenderOptions | None = None, *,
                layouts: dict[str, Layout] | None = None) -> RenderPlan:
    """Discover (unless ``source`` is a meeting already), analyse and plan a render.

    ``layouts``: the layout's rule layouts by name, when the caller has resolved them already
    (the farm does, under its storage root); otherwise they are loaded by name.
    """
    options = options or RenderOptions()
    if isinstance(source, Meeting):
        meeting = source
    else:
        meeting = discover(list(source), room=options.room, root=options.root)
    plan, speakers = plan_meeting(meeting, layout, layouts)
    planned = RenderPlan(meeting, plan, speakers, style_of(layout),
                         layout.model_dump(mode="json"), options.trim)
    planned.recordings = _recordings(planned.recording_paths)
    return planned


@dataclass
class RenderResult:
    outputs: list[Path]
    plan: Plan
    duration_s: float
    warnings: list[str] = field(default_factory=list)
    #: Frames rendered into each output.
    frames: int = 0


def render(
    render_plan: RenderPlan,
    outputs: Sequence[tuple[Path, Preset]],
    *,
    frames: tuple[int, int] | None = None,
    audio: bool = True,
    video: bool = True,
    workdir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    stage: Callable[[str], None] | None = None,
) -> RenderResult:
    """Render a planned meeting into each output (one melt run per rendition).

    ``frames``: only frames ``first`` to ``last`` of the rendered timeline (a chunk of a long
    meeting, or one frame for :data:`STILL`). ``audio=False`` or ``video=False``: that stream
    is left out (a chunk's video, a meeting's audio to put under chunks). Only a whole render
    with both streams is checked here (its streams and length); for a part, the caller knows
    what it should hold; an HLS output (:attr:`Preset.hls`) is rendered whole only, its parts
    being MP4 (:attr:`Preset.parts`). ``workdir``: where prepared media are kept and reused
    (default: a temporary folder). ``stage`` is told ``preparing media``, then ``rendering``
    before melt runs.
    """
    if not (audio or video):
        raise MelterError("a render needs audio, video or both")
    if (frames is not None or not (audio and video)) and any(p.hls for _, p in outputs):
        raise MelterError("an HLS playlist is rendered whole; render its parts with the "
                          "preset's parts (MP4)")
    fps = render_plan.fps
    count = 0
    with tempfile.TemporaryDirectory(prefix="melter-") as scratch:
        if stage is not None:
            stage("preparing media")
        media = prepare_media(render_plan.meeting, workdir or Path(scratch) / "media", fps)
        written: list[Path] = []
        for path, preset in outputs:
            built = _document(render_plan, media, preset, frames, video, audio)
            document = Path(scratch) / f"{path.stem}.mlt"
            document.write_text(built.xml)
            count = built.frames if frames is None else frames[1] - frames[0] + 1
            extra = [f"in={frames[0]}", f"out={frames[1]}"] if frames is not None else None
            if stage is not None:
                stage("rendering")
            target = (atomic_playlist(path, preset.keyframe_seconds or 6) if preset.hls
                      else atomic_output(path))
            with target as temp:
                properties = [f"{k}={v}" for k, v in preset.encoder_properties(fps).items()]
                if preset.still:
                    image = temp.with_suffix(".png")
                    run_melt(document, ["-consumer", f"avformat:{image}", *properties], count,
                             progress, extra=extra)
                    if not image.exists():
                        raise RenderError("melt wrote no preview frame")
                    image.replace(temp)
                else:
                    # One render thread: on a small machine a second costs more than it gains.
                    consumer = ["-consumer", f"avformat:{temp}", "real_time=-1", *properties]
                    if not audio:
                        consumer.append("an=1")
                    if not video and not preset.audio_only:
                        consumer.append("vn=1")
                    run_melt(document, consumer, count, progress, extra=extra)
                    if frames is None and audio and video:
                        check_output(temp, built.frames / fps, preset.audio_only)
            written.append(path)
    plan = render_plan.plan
    return RenderResult(written, plan, render_plan.duration_s, list(plan.warnings), count)


def _document(render_plan: RenderPlan, media: dict[str, PreparedSegment], preset: Preset,
              frames: tuple[int, int] | None, video: bool, audio: bool = True) -> Document:
    """The MLT document of a render; of a chunk (``frames``), one that holds nothing after
    the chunk's last frame (see :func:`chunk_key`) and no scene over before its first.

    Without ``audio`` it holds no sound at all: melt opens every input of its document,
    and a window's mix late in a long meeting costs far more to open than the window's
    pictures to render (a 30 s chunk at 320x180 an hour in: 37 s with the mix unheard in
    it, 3 s without)."""
    audio_only = preset.audio_only or not video
    silent: frozenset[str] | None = None if audio else frozenset()
    if frames is None or render_plan.trim:
        options = replace(render_plan.document_options(preset.width, preset.height,
                                                       audio_only=audio_only, window=frames),
                          heard=silent)
        return build_document(render_plan.plan, media, options)
    plan, kept = _within(render_plan.plan, media, frames)
    heard = silent if silent is not None else frozenset(
        seg for scene in render_plan.plan.scenes for seg in scene.audio if seg in kept)
    options = replace(render_plan.document_options(preset.width, preset.height,
                                                   audio_only=audio_only, window=frames),
                      colorspace=colorspace_of(media), heard=heard)
    return build_document(plan, kept, options)


def _within(plan: Plan, media: dict[str, PreparedSegment], frames: tuple[int, int],
            ) -> tuple[Plan, dict[str, PreparedSegment]]:
    """The plan and media a chunk of ``frames`` (first, last) is rendered from: those of a
    meeting that ends after its last frame, so that neither what happens after it nor how
    much was recorded after it (a recording still growing) changes its document, without
    the scenes over before its first frame. melt visits every transition of a document on
    every frame it renders, shown or not: with them, each chunk of a long meeting would cost
    more than the one before (a one-hour meeting's last chunks several times its first)."""
    first, last = frames
    start_us = round(first * 1_000_000 / plan.fps)
    end_us = round((last + 1) * 1_000_000 / plan.fps)
    scenes = [replace(scene, end_us=min(scene.end_us, end_us)) for scene in plan.scenes
              if scene.start_us < end_us and scene.end_us > start_us]
    kept = {key: replace(m, frames=max(1, min(m.frames, last + 1 - m.start_frame)))
            for key, m in media.items() if m.start_frame <= last}
    return replace(plan, scenes=scenes, duration_us=min(plan.duration_us, end_us)), kept


#: Changes whenever a chunk is rendered differently in a way its document does not show.
PART_FORMAT = "1"


def chunk_key(render_plan: RenderPlan, preset: Preset, frames: tuple[int, int], *,
              video: bool, workdir: Path) -> str:
    """A digest of everything a chunk's render depends on: its document (with each prepared
    file named by its segment, not by where it lies), the encoder's settings, and for each
    segment in it, the files and how their frames are placed up to the chunk's end
    (:meth:`melter.track.TrackAnalysis.timing_key`).

    Recordings only grow: a chunk rendered while the meeting went on and the same chunk of
    the finished meeting have the same key when nothing up to the chunk's end has changed, so
    the first one can stand for the second (the farm keeps chunks by key). A trimmed render
    has no chunk keys.
    """
    if render_plan.trim:
        raise MelterError("chunks of a trimmed render are not kept")
    fps = render_plan.fps
    media = prepare_media(render_plan.meeting, workdir, fps)
    document = _document(render_plan, media, preset, frames, video, audio=not video)
    xml = document.xml
    end_us = render_plan.meeting.start_us + round((frames[1] + 1) * 1_000_000 / fps)
    segments = {segment.id: segment for participant in render_plan.meeting.participants
                for segment in participant.segments}
    files: dict[str, Any] = {}
    for key, prepared in sorted(media.items()):
        if prepared.start_frame > frames[1]:
            continue
        for n, path in enumerate((prepared.path, prepared.audio_path)):
            if path is not None:
                for form in (graph_path(path), str(path)):
                    xml = xml.replace(form, f"@{key}:{n}")
        segment = segments[key]
        files[key] = {"tracks": [(t.path.name, t.timing_key(segment.start_us, end_us))
                                 for t in segment.tracks],
                      "lag": prepared.audio_lag, "first_video_us": prepared.first_video_us}
    identity = {"format": PART_FORMAT, "melter": __version__, "frames": list(frames),
                "video": video, "preset": preset.encoder_properties(fps) if video else {},
                "document": xml, "files": files}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class AudioPiece:
    """How a chunk's audio is made for a preset: AAC pieces that join by copying packets
    (:mod:`melter.splice`; rendered with context either side), or for other codecs PCM of
    exactly the chunk, which the join encodes at once."""

    #: The frames whose audio is rendered (the chunk, and its context).
    frames: tuple[int, int]
    #: The packets kept (AAC), or None (PCM).
    stretch: Stretch | None
    bit_rate: int
    suffix: str

    @property
    def packets(self) -> int | None:
        """Packets an AAC piece holds (None for the last piece, whose end is the meeting's,
        and for PCM)."""
        if self.stretch is None or self.stretch.end is None:
            return None
        return (self.stretch.end - self.stretch.start) // FRAME + (1 if self.stretch.first
                                                                     else 0)


def _bit_rate(text: str) -> int:
    text = text.strip().lower()
    return round(float(text[:-1]) * 1000) if text.endswith("k") else int(text)


def audio_piece(render_plan: RenderPlan, preset: Preset, chunk: tuple[int, int]) -> AudioPiece:
    """How chunk ``chunk`` (frames) of ``preset``'s audio is rendered."""
    first, last = chunk
    if preset.properties.get("acodec") != "aac":
        return AudioPiece(chunk, None, 0, PCM.suffix)
    fps, total = render_plan.fps, render_plan.frames
    run_in = math.ceil(RUN_IN * fps / MIX_RATE) + 1
    context = math.ceil(CONTEXT * fps / MIX_RATE) + 1
    stretch = Stretch(on_grid(pcm_samples(first, fps)),
                      None if last >= total - 1 else on_grid(pcm_samples(last + 1, fps)))
    frames = (max(0, first - run_in), min(total - 1, last + context))
    return AudioPiece(frames, stretch, _bit_rate(preset.properties.get("ab", "128k")), ".mka")


def audio_piece_key(render_plan: RenderPlan, preset: Preset, chunk: tuple[int, int], *,
                    workdir: Path) -> str:
    """:func:`chunk_key` of a chunk's audio piece."""
    piece = audio_piece(render_plan, preset, chunk)
    base = chunk_key(render_plan, PCM, piece.frames, video=False, workdir=workdir)
    identity = [base, piece.stretch and [piece.stretch.start, piece.stretch.end],
                piece.bit_rate, RUN_IN, CONTEXT]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def render_audio_piece(render_plan: RenderPlan, preset: Preset, chunk: tuple[int, int],
                       target: Path, *, workdir: Path,
                       progress: Callable[[int, int], None] | None = None,
                       stage: Callable[[str], None] | None = None) -> int:
    """Render chunk ``chunk``'s audio piece into ``target``; the packets (AAC) or samples
    (PCM) it holds, checked against what the chunk should hold."""
    piece = audio_piece(render_plan, preset, chunk)
    fps = render_plan.fps
    if piece.stretch is None:
        render(render_plan, [(target, PCM)], frames=chunk, video=False, workdir=workdir,
               progress=progress, stage=stage)
        expected = pcm_samples(chunk[1] + 1, fps) - pcm_samples(chunk[0], fps)
        with av.open(str(target)) as container:
            stream = container.streams.audio[0]
            size = stream.codec_context.channels * 2
            samples = sum(p.size for p in container.demux(stream)) // size
        if samples != expected:
            raise RenderError(f"audio of frames {chunk[0]}-{chunk[1]} has {samples} samples, "
                              f"not {expected}")
        return samples
    with tempfile.TemporaryDirectory(prefix="melter-audio-") as scratch:
        pcm = Path(scratch) / "context.wav"
        render(render_plan, [(pcm, PCM)], frames=piece.frames, video=False, workdir=workdir,
               progress=progress, stage=stage)
        packets = encode_stretch(pcm, pcm_samples(piece.frames[0], fps), piece.stretch,
                                 target, bit_rate=piece.bit_rate, rate=MIX_RATE)
    if piece.packets is not None and packets != piece.packets:
        raise RenderError(f"audio of frames {chunk[0]}-{chunk[1]} has {packets} packets, "
                          f"not {piece.packets}")
    return packets


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


__all__ = ["PART_FORMAT", "PCM", "PRESETS", "STILL", "AudioPiece", "Output", "Preset",
           "RenderOptions", "RenderPlan", "RenderResult", "StalePlan", "audio_piece",
           "audio_piece_key", "check_output", "chunk_key", "pcm_samples", "plan_render",
           "preset_for", "render", "render_audio_piece", "style_of", "trim_spans"]
