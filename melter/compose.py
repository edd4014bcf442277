"""The rendering layer's steps between a meeting and the MLT engine (callers outside that layer
use :mod:`melter.render`): :func:`plan_meeting` (the plan's inputs and the speaker timeline;
seconds, no media written) and :func:`prepare_media` (each participant segment remuxed once into
a Matroska file that starts on an output-frame boundary).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from melter.convert import CONTAINERS, convert_tracks
from melter.layout.model import Layout, load_layout
from melter.layout.speaker import (
    LevelTrack,
    levels_from_audio,
    levels_from_extension,
    speaker_timeline,
)
from melter.meeting import Meeting, Segment
from melter.plan import (
    VIDEO_OFF_US,
    ParticipantInfo,
    Plan,
    SegmentInfo,
    Span,
    SpeakerChange,
    build_plan,
)
from melter.track import STABLE_AFTER_S, TrackAnalysis

#: A plan made from recordings still being written equals the final plan up to this long
#: before the time they were read: their frames are placed for good up to
#: :data:`melter.track.STABLE_AFTER_S` before; the speaker decided at a moment hears one level
#: window past it (at most 2 s, :attr:`melter.layout.model.Speaker.window`), and a boundary
#: snaps to an output frame; a video gap is known to be one only when it has lasted
#: :data:`melter.plan.VIDEO_OFF_US` (2 s, within the same allowance).
PLAN_HORIZON_S = STABLE_AFTER_S + 3.0


def _video_spans(segment: Segment, origin_us: int) -> tuple[Span, ...]:
    """Where a segment shows pictures: its video track minus stretches without any.

    Audio and video of one publisher start and stop a few frames apart; such edges hold the
    first or last picture instead of flashing the placeholder card for a frame.
    """
    video = segment.video
    if video is None:
        return ()
    spans = []
    cursor = video.start_us
    if cursor - segment.start_us < VIDEO_OFF_US:
        cursor = segment.start_us
    for gap in video.gaps:
        if gap.length_us >= VIDEO_OFF_US:
            spans.append(Span(cursor - origin_us, gap.start_us - origin_us))
            cursor = gap.start_us + gap.length_us
    end = video.end_us if segment.end_us - video.end_us >= VIDEO_OFF_US else segment.end_us
    spans.append(Span(cursor - origin_us, end - origin_us))
    return tuple(s for s in spans if s.end_us > s.start_us)


def _picture_size(video: TrackAnalysis | None) -> tuple[int, int]:
    """The size a segment's pictures are planned for: the first the sender sent.

    Senders start small and grow as bandwidth allows, mostly keeping the shape; the largest
    size is only known at the end, and a plan must not change what it placed early on when the
    recording grows.
    """
    if video is None:
        return 0, 0
    if video.resolutions:
        _, width, height = video.resolutions[0]
        return width, height
    return video.max_width, video.max_height


def participants_for_plan(meeting: Meeting) -> list[ParticipantInfo]:
    origin = meeting.start_us
    infos = []
    for participant in meeting.participants:
        segments = tuple(
            SegmentInfo(
                id=segment.id,
                start_us=segment.start_us - origin,
                end_us=segment.end_us - origin,
                has_audio=segment.audio is not None,
                video_spans=_video_spans(segment, origin),
                width=_picture_size(segment.video)[0],
                height=_picture_size(segment.video)[1],
            )
            for segment in participant.segments
        )
        infos.append(ParticipantInfo(participant.id, participant.display, participant.kind,
                                     segments))
    return infos


def needs_speaker(layout: Layout, layouts: dict[str, Layout]) -> bool:
    all_layouts = [layout, *layouts.values()]
    return any(r.role != "grid" for lay in all_layouts for r in lay.regions)


def speaker_changes(meeting: Meeting, layout: Layout) -> list[SpeakerChange]:
    """The active-speaker timeline from the recorded audio (RFC 6464 levels when present)."""
    settings = layout.speaker
    window_us = round(settings.window * 1e6)
    base = meeting.start_us
    tracks: list[LevelTrack] = []
    for participant in meeting.participants:
        merged = None
        for segment in participant.segments:
            if segment.audio is None:
                continue
            audio = segment.audio
            if audio.audio_level_id is not None and audio.levels:
                levels = levels_from_extension(audio, base, window_us)
            else:
                levels = levels_from_audio(audio, base, window_us)
            merged = levels if merged is None else _maximum(merged, levels)
        if merged is not None:
            tracks.append(LevelTrack(participant.id, 0, window_us, merged))
    return speaker_timeline(tracks, settings, meeting.duration_us)


def _maximum(a, b):  # type: ignore[no-untyped-def]
    import numpy as np

    size = max(len(a), len(b))
    out = np.full(size, -127.0)
    out[: len(a)] = a
    out[: len(b)] = np.maximum(out[: len(b)], b)
    return out


def rule_layouts(layout: Layout) -> dict[str, Layout]:
    return {rule.layout: load_layout(rule.layout) for rule in layout.rules if rule.layout}


def plan_meeting(meeting: Meeting, layout: Layout,
                 layouts: dict[str, Layout] | None = None) -> tuple[Plan, list[SpeakerChange]]:
    """The scene plan and the speaker changes; ``layouts`` are the rule layouts by name when
    the caller has resolved them already (the farm does, under its storage root), else they
    are loaded by name here."""
    if layouts is None:
        layouts = rule_layouts(layout)
    pins = any(rule.pin for rule in layout.rules)
    speakers = speaker_changes(meeting, layout) if needs_speaker(layout, layouts) or pins else []
    plan = build_plan(participants_for_plan(meeting), meeting.duration_us, layout, speakers,
                      layouts)
    plan.warnings.extend(meeting.skipped)
    return plan, speakers


@dataclass(frozen=True)
class PreparedSegment:
    """A segment's media in one file, and where it sits on the output timeline (frames)."""

    segment: str
    path: Path
    start_frame: int
    frames: int
    has_audio: bool
    has_video: bool
    width: int
    height: int
    #: The video's typical frame interval (seconds; 0 without video or with one picture).
    frame_interval: float = 0.0
    codec: str = ""
    #: The display rotation the pictures need (degrees clockwise) and a horizontal flip after
    #: it, as the recording's video orientation extension first said.
    rotation: int = 0
    flip: bool = False
    #: Channels of the file's audio stream (0: none).
    audio_channels: int = 0
    #: The file's first video key frame time, where MLT puts the segment's time zero.
    first_video_us: int = 0
    #: Audio Matroska cannot carry as sent (G.711, G.722, L16) goes decoded into a WAV file of
    #: its own, whose time zero is that same key frame's.
    audio_path: Path | None = None
    #: Samples by which a whole read of the audio file (counting decoded samples from its
    #: start) runs ahead of a read that seeks (placing samples by their timestamps): what a
    #: window's mix corrects by, to hold the samples a whole render holds.
    audio_lag: int = 0

    @property
    def audio_file(self) -> Path:
        return self.audio_path or self.path


#: Changes whenever prepared files are written differently, so older ones are not reused.
_PREPARED_LAYOUT = ("6: audio apart (Ogg or WAV), first picture at time zero, no short silence, "
                    "lag of a read placed by timestamps")


def _segment_key(segment: Segment, start_us: int) -> str:
    """The name of a segment's prepared files: what they are made of.

    A track read by the compiled pass is written from the bytes it analysed and no further
    (:attr:`TrackAnalysis.compiled_end`): its files are named by that extent, so a recording
    still growing keeps the name its plan gave it, and every unit of a job planned from it
    prepares it once. A track the Python pass read is named by the file as it is now."""
    digest = hashlib.sha256(_PREPARED_LAYOUT.encode())
    for track in segment.tracks:
        stat = track.path.stat()
        extent = (f"{stat.st_ino}|{track.header.created_us}|{track.compiled_end}"
                  if track.compiled_end is not None
                  else f"{stat.st_size}|{stat.st_mtime_ns}")
        digest.update(f"{track.path.resolve()}|{extent}".encode())
    digest.update(str(start_us).encode())
    return digest.hexdigest()[:16]


def _frame_interval(video: TrackAnalysis | None) -> float:
    if video is None or video.frames < 2 or video.duration_us <= 0:
        return 0.0
    return video.duration_us / 1e6 / (video.frames - 1)


def _orientation(video: TrackAnalysis | None) -> tuple[int, bool]:
    """The turn (degrees clockwise) and flip the recording's first orientation asks for."""
    if video is None or not video.rotations:
        return 0, False
    _, degrees, flip = video.rotations[0]
    return degrees % 360, bool(flip)


def _probe(path: Path) -> tuple[int, int]:
    """The prepared file's audio channel count, and its first video key frame's time (us).

    MLT counts a file's time from that key frame, for its audio too; an engine that reads the
    audio another way needs it to stay in step with what MLT shows (milliseconds to read).
    Known once per file as it is: a prerender names every chunk of a long meeting, each
    from the same prepared files.
    """
    stat = path.stat()
    return _probed(str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _probed(path: str, inode: int, size: int, mtime_ns: int) -> tuple[int, int]:
    with av.open(path) as container:
        audio = container.streams.audio
        channels = audio[0].codec_context.channels if audio else 0
        first_video_us = 0
        if container.streams.video:
            stream = container.streams.video[0]
            for packet in container.demux(stream):
                if packet.pts is not None and packet.time_base and packet.is_keyframe:
                    first_video_us = round(float(packet.pts * packet.time_base) * 1e6)
                    break
        return channels, first_video_us


#: The stretch a lag is measured over: a second read from its start, the next one after a seek.
_LAG_PROBE_S = 1.0
_LAG_RANGE = 4800


def _decoded(path: Path, chain: str) -> np.ndarray:
    """The first channel of ``path`` read through ``chain`` (FFmpeg's filters), as floats."""
    graph = f"amovie={_filter_path(path)}{chain},aformat=sample_fmts=flt:channel_layouts=mono"
    done = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", graph,
                           "-f", "f32le", "-"], capture_output=True, timeout=60, check=False)
    return np.frombuffer(done.stdout, np.float32)


def _filter_path(path: Path) -> str:
    """``path`` as a filter option's value inside a graph: escaped for the option, then for
    the graph (FFmpeg's two levels of escaping)."""
    value = "".join("\\" + c if c in "\\':" else c for c in str(path))
    return "".join("\\" + c if c in "\\'[],;" else c for c in value)


def _audio_lag(path: Path) -> int:
    """How many samples a whole read of ``path`` runs ahead of one that seeks (see
    :attr:`PreparedSegment.audio_lag`), found by matching the two reads sample for sample
    (0 for a file too short or too quiet to tell, where no window seeks anyway).

    A read that seeks places its samples by their timestamps, and FFmpeg's Opus decoder
    labels the first samples it keeps after a seek as if the pre-skip it dropped were still
    there (-312 for Melter's files); a file whose first packet is shorter than the pre-skip
    also loses that packet in a read from the start, which counts samples. Past the start
    the two reads differ by that constant.
    """
    rate = 48000
    probe = round(_LAG_PROBE_S * rate)
    whole = _decoded(path, f",aresample={rate}:first_pts=0,"
                     f"atrim=end_sample={3 * probe + _LAG_RANGE}")
    # The read that seeks places its samples by their timestamps, as a window's mix does.
    sought = _decoded(path, f":seek_point={_LAG_PROBE_S},aresample={rate},"
                      f"atrim=start_pts={2 * probe}:end_pts={3 * probe}")
    if len(sought) < probe or len(whole) < 3 * probe + _LAG_RANGE or not np.any(sought):
        return 0
    # The decoder that sought has run in for a second: equal to far below one 16-bit step.
    for lag in sorted(range(-_LAG_RANGE, _LAG_RANGE + 1), key=abs):
        if np.max(np.abs(whole[2 * probe + lag:3 * probe + lag] - sought)) < 1e-5:
            return lag
    return 0


def _cached_lag(path: Path) -> int:
    """:func:`_audio_lag` of a prepared file, kept beside it (the file's name is its key)."""
    note = path.with_name(path.name + ".lag")
    try:
        return int(note.read_text())
    except (OSError, ValueError):
        pass
    lag = _audio_lag(path)
    temp = note.with_name(f".{note.name}.{os.getpid()}")
    temp.write_text(str(lag))
    temp.replace(note)
    return lag


def prepare_media(meeting: Meeting, workdir: Path, fps: int) -> dict[str, PreparedSegment]:
    """Remux each segment once, starting exactly on an output frame (cached in ``workdir``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    frame_us = 1_000_000 / fps
    total_frames = math.ceil(meeting.duration_us / frame_us)
    prepared: dict[str, PreparedSegment] = {}
    for participant in meeting.participants:
        for segment in participant.segments:
            start_frame = math.floor((segment.start_us - meeting.start_us) / frame_us)
            origin_us = meeting.start_us + round(start_frame * frame_us)
            end_frame = min(total_frames, math.ceil((segment.end_us - meeting.start_us) / frame_us))
            video = segment.video
            key = _segment_key(segment, origin_us)
            path = workdir / f"{participant.id}-{segment.index}-{key}.mkv"
            audio = segment.audio
            # Audio goes into a file of its own: Ogg for Opus (its timestamps count samples,
            # so a window's mix can start reading anywhere and land on the sample a whole
            # render reaches), WAV for what Matroska cannot carry as sent.
            apart = audio is not None
            remuxed = [t for t in segment.tracks if not (apart and t is audio)]
            channels, first_video_us = 0, 0
            if remuxed:
                if not path.exists():
                    convert_tracks(remuxed, path, origin_us=origin_us, lead_in=True)
                channels, first_video_us = _probe(path)
            audio_path = None
            lag = 0
            rotation, flip = _orientation(video)
            if apart and audio is not None:
                audio_path = path.with_suffix(
                    ".opus" if audio.codec in CONTAINERS[".opus"][1] else ".wav")
                if not audio_path.exists():
                    convert_tracks([audio], audio_path, origin_us=origin_us + first_video_us)
                channels = _probe(audio_path)[0]
                lag = _cached_lag(audio_path)
            prepared[segment.id] = PreparedSegment(
                segment.id,
                path if remuxed else audio_path or path,
                start_frame,
                max(1, end_frame - start_frame),
                segment.audio is not None,
                video is not None,
                video.max_width if video else 0,
                video.max_height if video else 0,
                _frame_interval(video),
                video.codec if video else "",
                rotation,
                flip,
                channels,
                first_video_us,
                audio_path,
                lag,
            )
    return prepared
