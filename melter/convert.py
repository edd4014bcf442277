"""Tracks to playable files with PyAV: remux without re-encoding, or merge one participant.

Every frame is placed by its wall-clock time (see :mod:`melter.track`), so a merged file's audio
and video line up by the Janus host's clock, not by where each file happens to start. Audio gaps
(loss, DTX, pauses) are filled with codec-level silence so decoders see a continuous stream as
long as the wall-clock span; video keeps its variable frame timing.

Outputs are written under a temporary name beside the target and renamed into place when they
are complete: a failed conversion never leaves a half file or replaces a good one.
"""

from __future__ import annotations

import errno
import heapq
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
from av.audio.codeccontext import AudioCodecContext
from av.audio.stream import AudioStream
from av.container import OutputContainer
from av.stream import Stream
from av.video.stream import VideoStream

from melter.depay import audio_depacketizer
from melter.errors import MelterError, UnsupportedError
from melter.limits import check_meeting_span, check_recording_span
from melter.track import TrackAnalysis, analyze, data_messages, timed_frames

MICROSECONDS = Fraction(1, 1_000_000)
_LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}

#: Container format and the codecs it carries without re-encoding.
CONTAINERS: dict[str, tuple[str, set[str]]] = {
    ".opus": ("opus", {"opus", "multiopus"}),
    ".ogg": ("ogg", {"opus", "multiopus"}),
    ".webm": ("webm", {"vp8", "vp9", "av1", "opus", "multiopus"}),
    ".mkv": ("matroska", {"vp8", "vp9", "av1", "h264", "h265", "opus", "multiopus"}),
    ".mp4": ("mp4", {"vp9", "av1", "h264", "h265", "opus", "multiopus"}),
}
DECODED = {".wav"}
TEXT = {".srt"}
_ENCODER_FOR = {
    "vp8": "libvpx",
    "vp9": "libvpx-vp9",
    "h264": "libx264",
    "h265": "libx265",
    "av1": "libsvtav1",
    "opus": "libopus",
    "multiopus": "libopus",
}
#: Audio silence inserted only when a gap is at least this long (smaller offsets are the
#: rounding of RTP time to samples).
_MIN_FILL_S = 0.0025
#: Audio running this far ahead of its wall-clock place (overlap after a clock repair) is
#: dropped rather than shifting everything after it.
_MAX_AHEAD_S = 0.040


@dataclass
class ConvertReport:
    output: Path
    tracks: list[TrackAnalysis]
    frames_written: dict[str, int] = field(default_factory=dict)
    silence_ms: float = 0.0
    dropped_audio: int = 0
    warnings: list[str] = field(default_factory=list)
    start_us: int = 0
    duration_us: int = 0


def file_mode() -> int:
    """The mode a new file of this process gets: 0o666 less its umask, read without changing
    it (other threads may be creating files). Temporary files are created private."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


@contextmanager
def atomic_output(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target``; renamed onto it only if the block succeeds.

    The file gets the mode any new file of the user gets (0644 under the usual umask, not
    ``mkstemp``'s 0600: web servers and other containers read outputs), and reaches the disk
    before it takes the name, so a crash never leaves a named but partial output. A full
    disk is said in words, with the folder.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(
        prefix=f".{target.stem}.", suffix=f".part{target.suffix}", dir=target.parent
    )
    os.fchmod(handle, file_mode())
    os.close(handle)
    temp = Path(temp_name)
    try:
        try:
            yield temp
            with open(temp, "rb") as written:
                os.fsync(written.fileno())
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise MelterError(f"no space left on device at {target.parent} (writing "
                                  f"{target.name})") from None
            raise
        os.replace(temp, target)
        folder = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    finally:
        if temp.exists():
            temp.unlink()


def _open_stream(container: OutputContainer, analysis: TrackAnalysis) -> Stream:
    """An output stream carrying the track's own codec configuration.

    PyAV builds stream parameters from a codec context; the context is opened here and then
    given the sender's real configuration (OpusHead, SPS/PPS...) so nothing of the stand-in
    encoder's own settings reaches the file.
    """
    codec = analysis.codec
    encoder = _ENCODER_FOR[codec]
    stream: Stream
    if analysis.kind == "audio":
        audio = container.add_stream(encoder, rate=48000)
        assert isinstance(audio, AudioStream)
        actx = audio.codec_context
        actx.layout = _LAYOUTS.get(analysis.channels, "stereo")
        actx.open()
        actx.extradata = analysis.extradata
        stream = audio
    else:
        video = container.add_stream(encoder)
        assert isinstance(video, VideoStream)
        vctx = video.codec_context
        vctx.width = analysis.max_width or 640
        vctx.height = analysis.max_height or 480
        # No nominal frame rate: frame times are the recording's own (a nominal rate would
        # make Matroska give the last picture a default duration).
        vctx.framerate = Fraction(0, 1)
        if codec == "h265":
            vctx.options = {"x265-params": "log-level=none"}
        if codec == "av1":
            vctx.options = {"svtav1-params": "lp=1"}
        vctx.open()
        vctx.extradata = analysis.extradata
        if codec == "h265" and container.format.name == "mp4":
            vctx.codec_tag = "hvc1"
        if analysis.rotations:
            degrees, flip = analysis.rotations[0][1], analysis.rotations[0][2]
            # The extension says how far to turn the picture clockwise; PyAV takes the
            # display rotation counter-clockwise.
            video.set_display_rotation(-degrees, hflip=flip)
        stream = video
    stream.time_base = MICROSECONDS
    return stream


class _AudioPlacer:
    """Keeps an audio stream's sample count on the wall clock: fills gaps, drops overlaps."""

    def __init__(self, analysis: TrackAnalysis, origin_us: int) -> None:
        self.analysis = analysis
        self.depay = audio_depacketizer(analysis.codec)
        self.rate = self.depay.sample_rate
        self.origin_us = origin_us
        self.position = 0
        self.silence_samples = 0
        self.dropped = 0

    def target(self, wall_us: int) -> int:
        return round((wall_us - self.origin_us) * self.rate / 1_000_000)

    def place(self, wall_us: int, samples: int) -> tuple[int, int] | None:
        """``(silence to insert first, pts)`` for a frame, or None to drop it."""
        target = self.target(wall_us)
        behind = target - self.position
        if behind < -_MAX_AHEAD_S * self.rate:
            self.dropped += 1
            return None
        fill = behind if behind >= _MIN_FILL_S * self.rate else 0
        return fill, self.position + fill


class _Rescale:
    """Microseconds to a stream's own time base, rounded as FFmpeg rounds (``av_rescale_q``,
    half away from zero).

    Timestamps are written in the time base the muxer chose (1/48000 for Ogg audio, 1/1000
    for WebM...) once the header is out, so PyAV has nothing to rescale per packet.
    """

    def __init__(self, stream: Stream) -> None:
        time_base = stream.time_base
        assert time_base is not None
        self.multiplier = time_base.denominator
        self.divisor = time_base.numerator * 1_000_000
        self.half = self.divisor // 2

    def __call__(self, microseconds: int) -> int:
        if microseconds < 0:
            return -((-microseconds * self.multiplier + self.half) // self.divisor)
        return (microseconds * self.multiplier + self.half) // self.divisor


#: A packet ready for the muxer and its decoding time in microseconds (to interleave tracks).
_Timed = tuple[int, av.Packet]


def _audio_packets(
    stream: Stream, analysis: TrackAnalysis, origin_us: int, report: ConvertReport
) -> Iterator[_Timed]:
    placer = _AudioPlacer(analysis, origin_us)
    depay = placer.depay
    rate = placer.rate
    scale = 1_000_000 / rate
    rescale = _Rescale(stream)
    multiplier, divisor, half = rescale.multiplier, rescale.divisor, rescale.half
    # Ogg and MP4 count audio time in samples: the timestamps are the sample position itself
    # (what rescaling its microseconds would give back).
    in_samples = stream.time_base == Fraction(1, rate)
    min_fill = _MIN_FILL_S * rate
    max_behind = -_MAX_AHEAD_S * rate
    Packet = av.Packet
    written = 0
    position = 0

    def packet(data: bytes, samples: int) -> _Timed:
        out = Packet(data)
        out.stream = stream
        pts_us = round(position * scale)
        if in_samples:
            out.pts = out.dts = position
            out.duration = samples
        else:
            out.pts = out.dts = (pts_us * multiplier + half) // divisor
            out.duration = (round(samples * scale) * multiplier + half) // divisor
        return pts_us, out

    # The placement of _AudioPlacer.place, inlined: this loop runs once per audio packet.
    for frame in timed_frames(analysis):
        behind = round((frame.wall_us - origin_us) * rate / 1_000_000) - position
        if behind < max_behind:
            placer.dropped += 1
            continue
        if behind >= min_fill:
            for data, samples in depay.silence(behind):
                yield packet(data, samples)
                position += samples
                placer.silence_samples += samples
        yield packet(frame.data, frame.samples)
        position += frame.samples
        written += 1
    report.frames_written[analysis.kind] = written
    report.silence_ms += 1000 * placer.silence_samples / placer.rate
    report.dropped_audio += placer.dropped


def _video_packets(
    stream: Stream, analysis: TrackAnalysis, origin_us: int, report: ConvertReport,
    shift_us: int = 0, lead_in: bool = False,
) -> Iterator[_Timed]:
    last_pts = -1
    origin_us -= shift_us
    rescale = _Rescale(stream)
    written = 0
    pending: av.Packet | None = None
    pending_us = 0
    for frame in timed_frames(analysis):
        pts = max(frame.wall_us - origin_us, last_pts + 1)
        if lead_in and pending is None and pts > 0 and frame.keyframe:
            # The first picture once more at time zero: MLT counts a file's time from its
            # first video key frame (its audio too), so that frame must be at zero.
            first = av.Packet(frame.data)
            first.stream = stream
            first.pts = first.dts = rescale(0)
            first.is_keyframe = True
            first.duration = rescale(pts)
            last_pts = 0
            yield 0, first
        if pending is not None:
            pending.duration = rescale(pts - pending_us)
            yield pending_us, pending
        packet = av.Packet(frame.data)
        packet.stream = stream
        packet.pts = packet.dts = rescale(pts)
        packet.is_keyframe = frame.keyframe
        pending = packet
        pending_us = pts
        last_pts = pts
        written += 1
    if pending is not None:
        # The track ends at its last picture (as janus-pp-rec measures it), so that picture
        # gets no duration of its own rather than a guessed frame interval.
        pending.duration = rescale(1)
        yield pending_us, pending
    report.frames_written["video"] = written


def _mux(
    container: OutputContainer,
    streams: list[Stream],
    analyses: list[TrackAnalysis],
    origin_us: int,
    report: ConvertReport,
    video_shift_us: int = 0,
    lead_in: bool = False,
) -> None:
    """Interleave the tracks' packets by time ourselves, so the muxer buffers next to nothing
    (whole tracks written one after the other would sit in its interleaving queue)."""
    container.start_encoding()  # the header fixes each stream's time base
    sources = [
        _video_packets(s, a, origin_us, report, video_shift_us, lead_in)
        if a.kind == "video"
        else _audio_packets(s, a, origin_us, report)
        for a, s in zip(analyses, streams, strict=True)
    ]
    mux = container.mux_one
    timed = sources[0] if len(sources) == 1 else heapq.merge(*sources, key=lambda item: item[0])
    for _, packet in timed:
        mux(packet)


def convert(inputs: list[Path], output: Path) -> ConvertReport:
    """Convert one track, or merge one participant's audio and video, into ``output``."""
    return convert_tracks([analyze(path) for path in inputs], output)


def convert_tracks(
    analyses: list[TrackAnalysis], output: Path, origin_us: int | None = None,
    video_shift_us: int = 0,
    lead_in: bool = False,
) -> ConvertReport:
    """Write analysed tracks into ``output``; time zero is ``origin_us`` (default: earliest).

    ``video_shift_us`` writes every picture that much later than its wall-clock time (for a
    renderer that shows pictures early; see :mod:`melter.compose`). ``lead_in`` writes the
    first picture once more at time zero (for MLT, which counts time from the first picture).
    """
    suffix = output.suffix.lower()
    analyses = list(analyses)
    kinds = [a.kind for a in analyses]
    if len(analyses) > 2 or len(set(kinds)) != len(kinds):
        raise UnsupportedError(
            f"convert takes one recording, or one audio and one video recording of the same "
            f"participant (got {', '.join(kinds)})"
        )
    report = ConvertReport(output, analyses)
    if suffix in TEXT:
        if kinds != ["data"]:
            raise UnsupportedError(f"{output}: .srt output needs a data recording")
        with atomic_output(output) as temp:
            _write_srt(analyses[0], temp)
        report.frames_written["data"] = analyses[0].frames
        return report
    if "data" in kinds:
        raise UnsupportedError(f"{analyses[kinds.index('data')].path}: a data recording "
                               "converts to .srt")
    for analysis in analyses:
        check_recording_span(analysis.path, analysis.start_us, analysis.end_us)
    if origin_us is None:
        origin_us = min(a.start_us for a in analyses)
    end_us = max(a.end_us for a in analyses)
    if len(analyses) > 1:
        check_meeting_span(origin_us, end_us)
    report.start_us = origin_us
    report.duration_us = end_us - origin_us
    if suffix in DECODED:
        if kinds != ["audio"]:
            raise UnsupportedError(f"{output}: .wav output needs one audio recording")
        with atomic_output(output) as temp:
            _write_wav(analyses[0], temp, origin_us, report)
    else:
        if suffix not in CONTAINERS:
            choices = ", ".join(sorted(list(CONTAINERS) + sorted(DECODED | TEXT)))
            raise UnsupportedError(f"{output}: unknown output type {suffix!r} (use {choices})")
        format_name, allowed = CONTAINERS[suffix]
        for analysis in analyses:
            if analysis.codec not in allowed:
                better = [s for s, (_, codecs) in CONTAINERS.items() if analysis.codec in codecs]
                hint = f"; use {' or '.join(better)}" if better else "; use .wav (decoded)"
                raise UnsupportedError(
                    f"{analysis.path}: {analysis.codec} cannot go into {suffix} without "
                    f"re-encoding{hint}"
                )
        analyses.sort(key=lambda a: a.kind != "video")  # video stream first
        with atomic_output(output) as temp:
            options = {"movflags": "+faststart"} if format_name == "mp4" else {}
            with av.open(str(temp), "w", format=format_name, options=options) as container:
                streams = [_open_stream(container, a) for a in analyses]
                _mux(container, streams, analyses, origin_us, report, video_shift_us, lead_in)
    for analysis in analyses:
        report.warnings.extend(analysis.warnings)
    return report


def _write_wav(analysis: TrackAnalysis, temp: Path, origin_us: int, report: ConvertReport) -> None:
    """Decode a track to 16-bit PCM, silence in its gaps."""
    import numpy as np  # only here: conversions that remux need not load it
    placer = _AudioPlacer(analysis, origin_us)
    decoder = av.CodecContext.create(placer.depay.codec_name, "r")
    assert isinstance(decoder, AudioCodecContext)
    decoder.sample_rate = placer.rate
    decoder.layout = _LAYOUTS.get(analysis.channels, "mono")
    if analysis.extradata:
        decoder.extradata = analysis.extradata
    channels = analysis.channels or 1
    resampler = av.AudioResampler(format="s16", layout=decoder.layout, rate=placer.rate)
    written = 0
    with av.open(str(temp), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=placer.rate)
        stream.codec_context.layout = decoder.layout

        def write(samples: Any) -> None:
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples.reshape(1, -1)), format="s16", layout=decoder.layout
            )
            frame.sample_rate = placer.rate
            frame.pts = None
            for packet in stream.encode(frame):
                container.mux(packet)

        for timed in timed_frames(analysis):
            placed = placer.place(timed.wall_us, timed.samples)
            if placed is None:
                continue
            fill, _ = placed
            if fill:
                # In blocks of a second: a gap may last hours.
                for start in range(0, fill, placer.rate):
                    write(np.zeros(min(placer.rate, fill - start) * channels, dtype=np.int16))
                placer.position += fill
                placer.silence_samples += fill
            decoded = []
            for frame in decoder.decode(av.Packet(timed.data)):
                for pcm in resampler.resample(frame):
                    decoded.append(pcm.to_ndarray().reshape(-1))
            if not decoded:
                continue
            samples = np.concatenate(decoded)
            write(samples)
            placer.position += samples.size // channels
            written += 1
        for packet in stream.encode(None):
            container.mux(packet)
    report.frames_written["audio"] = written
    report.silence_ms += 1000 * placer.silence_samples / placer.rate
    report.dropped_audio += placer.dropped


def _srt_time(microseconds: int) -> str:
    milliseconds = max(0, microseconds) // 1000
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d},{millis:03d}"


#: How long a data-channel message stays on screen when no later message replaces it.
SRT_HOLD_US = 3_000_000


def _write_srt(analysis: TrackAnalysis, temp: Path) -> None:
    """Data-channel text as SubRip cues, times from the recording's start (comma decimals)."""
    origin = analysis.start_us
    messages = sorted(data_messages(analysis.path), key=lambda item: item[0])
    with temp.open("w", encoding="utf-8") as out:
        for number, (when, message) in enumerate(messages, start=1):
            following = messages[number][0] if number < len(messages) else when + SRT_HOLD_US
            end = min(following, when + SRT_HOLD_US)
            text = message.decode("utf-8", "replace").replace("\r\n", "\n").strip() or " "
            out.write(f"{number}\n{_srt_time(when - origin)} --> {_srt_time(end - origin)}\n")
            out.write(f"{text}\n\n")


def raw_data(path: Path, output: Path) -> int:
    """Binary data-channel messages back to back, as sent (no timing)."""
    count = 0
    with atomic_output(output) as temp, temp.open("wb") as out:
        for _, message in data_messages(path):
            out.write(message)
            count += 1
    return count


__all__ = ["ConvertReport", "MelterError", "convert", "raw_data"]
