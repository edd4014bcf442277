"""A recording's timing: every frame placed on the Janus host's wall clock.

Two streaming passes over the file, so memory stays flat for any length:

1. :func:`analyze` reads the ordered packets once and learns the track's timing model — where
   the RTP clock jumps or resets against arrival times (timeline *pieces*), the clock skew
   between the sender's RTP clock and the Janus host's clock, gaps with their causes, key
   frames, resolutions and rotations — and the stream facts a container header needs.
2. :func:`timed_frames` reads the packets again and yields codec frames with wall-clock times
   from that model.

The model: inside a piece, the wall clock is a continuous piecewise-linear function of ``t``, the
RTP time since the track's start, that sits on the lower envelope of ``arrival - t`` (the least
delayed packets), so network jitter does not shift the track. A piece starts where that
envelope moves by more than :data:`JUMP_TOLERANCE_S` for good: a timestamp reset, or a sender
that stopped its clock during a pause. A pause whose RTP time kept running (Janus rewrites
timestamps after a pause) needs no piece: it is a gap in RTP time and becomes silence on output.

The model is causal, so that a recording read while Janus still writes it (a prefix of the final
file) places every frame exactly where the whole file will, except the last
:data:`STABLE_AFTER_S` seconds: a piece's offset comes from its least-delayed packet in its first
:data:`OFFSET_SPAN_S` seconds, and every :data:`KNOT_INTERVAL_S` seconds a knot sets the slope
for the next interval from the envelope seen before the knot only — the clock skew (Theil–Sen
over the envelope so far) plus what brings the line back onto that envelope by the next knot.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from melter.depay import (
    CLOCK_RATES,
    AudioDepacketizer,
    VideoDepacketizer,
    audio_depacketizer,
    resolve_codec,
    video_depacketizer,
)
from melter.depay.red import parse_red
from melter.errors import InputError, UnsupportedError
from melter.mjr.reader import MjrHeader, MjrReader, Variant
from melter.mjr.rtp import URI_AUDIO_LEVEL, URI_VIDEO_ORIENTATION, audio_level, video_rotation
from melter.order import OrderedPacket, OrderStats, ordered_packets

try:
    from melter import _fastpath
except ImportError:  # installed without a C compiler: the Python passes do all the work
    _fastpath = None  # type: ignore[assignment]

#: How far the arrival-vs-RTP offset must move, and stay moved, to count as a clock jump.
JUMP_TOLERANCE_S = 0.5
#: How long (RTP time) a moved offset must hold before it is believed (bursts after a network
#: stall return to the envelope well within this).
JUMP_CONFIRM_S = 1.0
#: Without arrival times (old variants) only a jump this large is taken for a reset.
NO_ARRIVAL_JUMP_S = 300.0
#: A packet later than this behind the envelope has a damaged timestamp, not a slow network.
MAX_DELAY_S = 10.0
#: Envelope windows with fewer packets than this are not used (a lone packet after a pause
#: says little about the clock).
MIN_WINDOW_PACKETS = 5
#: Window over which the lower envelope is taken for the skew fit.
ENVELOPE_WINDOW_S = 2.0
#: Skew is estimated only over a span at least this long; shorter tracks get 0.
MIN_SKEW_SPAN_S = 20.0
#: A slope (skew plus correction) this steep is something else (a stall pattern): time is
#: never bent by more.
MAX_SKEW = 5e-3
#: A piece's offset is its least-delayed packet among those of its first seconds (RTP time
#: from its first packet): a few hundred audio packets find the envelope within a millisecond
#: on a quiet network, and the first knot corrects what they miss.
OFFSET_SPAN_S = 3.0
#: Knots of the wall-clock line, this far apart in RTP time. A knot's slope comes from the
#: envelope before it; the first knot of a track comes after :data:`MIN_SKEW_SPAN_S` of
#: envelope, so a skew of 100 ppm is off by at most 3 ms before it.
KNOT_INTERVAL_S = 30.0
#: A knot fits the skew to the latest this many envelope points, and steers to their lower
#: envelope: about ten minutes of a continuous track, so a knot's work is bounded (pairs grow
#: with the square) and a clock whose rate drifts is followed.
MAX_FIT_POINTS = 300
#: The timing of a recording's prefix equals the whole file's for every frame placed more than
#: this before the prefix's last arrival: the offset needs :data:`OFFSET_SPAN_S` of packets, a
#: knot the envelope window that straddles it (:data:`ENVELOPE_WINDOW_S`), and packets arrive
#: late by up to the rest.
STABLE_AFTER_S = 5.0
#: A clock jump opens a gap longer than all the media before it only when the arrival clock
#: is damaged or stepped, unless the gap is shorter than this (a sender's pause).
CLOCK_FAULT_MIN_S = 60.0
#: Changes whenever the same recording would be placed differently, so stored timing keys of
#: older versions never match.
TIMING_MODEL = "causal-knots-1"
#: A video interval this long counts as a gap.
VIDEO_GAP_S = 0.5
MAX_LISTED = 10000
#: Set (to anything) to run the Python passes even where the compiled ones apply.
PURE_PYTHON_ENV = "MELTER_PURE_PYTHON"
#: Codecs the compiled passes cover (without RED, in MJR00002 files): what nearly every
#: VideoRoom recording holds.
_COMPILED_CODECS = frozenset({("audio", "opus"), ("audio", "multiopus"), ("video", "vp8")})


@dataclass
class Gap:
    """A stretch of the track with no media, on the wall clock."""

    start_us: int
    length_us: int
    cause: str  # loss | pause | clock-jump | ssrc-change
    packets_lost: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "start_us": self.start_us,
            "length_ms": round(self.length_us / 1000, 1),
            "cause": self.cause,
            "packets_lost": self.packets_lost,
        }


@dataclass
class Piece:
    """A run of packets whose RTP clock is continuous against the arrival clock."""

    first_index: int
    t_start: float  # RTP seconds of the first packet
    reason: str
    offset_us: float = 0.0
    minima: list[tuple[float, float]] = field(default_factory=list)  # (t, arrival - t)
    #: The least-delayed packet of the piece's first :data:`OFFSET_SPAN_S` seconds.
    lowest: tuple[float, float] | None = None
    #: The wall-clock line: from RTP time ``t_from`` on (to the next knot),
    #: ``wall_us = offset_us + t * (1 + slope) * 1e6``; the first knot is the piece's start.
    knots: list[tuple[float, float, float]] = field(default_factory=list)
    #: RTP seconds where the piece's media ends.
    t_end: float = 0.0

    def line(self) -> list[tuple[float, float, float]]:
        """The knots, or one line at the piece's offset for a piece never fitted."""
        return self.knots or [(self.t_start, self.offset_us, 0.0)]


@dataclass
class TrackAnalysis:
    path: Path
    header: MjrHeader
    codec: str
    clock_rate: int
    stats: OrderStats
    pieces: list[Piece]
    #: The clock skew the envelope shows at the end (a summary: each knot has its own slope).
    skew: float = 0.0
    start_us: int = 0
    end_us: int = 0
    first_ts: int = 0
    gaps: list[Gap] = field(default_factory=list)
    gap_count: int = 0
    keyframes_us: list[int] = field(default_factory=list)
    resolutions: list[tuple[int, int, int]] = field(default_factory=list)  # (wall_us, w, h)
    rotations: list[tuple[int, int, bool]] = field(default_factory=list)  # (wall_us, deg, flip)
    max_width: int = 0
    max_height: int = 0
    frames: int = 0
    media_us: int = 0
    audio_level_id: int | None = None
    orientation_id: int | None = None
    levels: dict[int, int] = field(default_factory=dict)  # -dBov -> packet count
    outliers: set[int] = field(default_factory=set)  # indices of packets left out
    extradata: bytes | None = None
    channels: int = 0
    sample_rate: int = 0
    warnings: list[str] = field(default_factory=list)
    #: Where the compiled first pass stopped reading (the file's size then); None when the
    #: Python pass ran. The second pass reads as far, and through the same code.
    compiled_end: int | None = None

    @property
    def kind(self) -> str:
        return self.header.kind

    @property
    def skew_ppm(self) -> float:
        return self.skew * 1e6

    @property
    def duration_us(self) -> int:
        return max(0, self.end_us - self.start_us)

    @property
    def loss_percent(self) -> float:
        expected = self.stats.packets + self.stats.lost
        return 100.0 * self.stats.lost / expected if expected else 0.0

    def timing_key(self, start_us: int, end_us: int) -> str:
        """A digest of all that places this track's frames of wall time ``[start_us, end_us)``:
        the file, and each piece and line segment that reaches into that stretch.

        A renderer reuses a window it rendered from a growing recording while the key stays
        the same: it does for a prefix and the whole file when ``end_us`` lies
        :data:`STABLE_AFTER_S` before the prefix's last arrival.
        """
        digest = hashlib.sha256(repr((
            TIMING_MODEL, self.path.name, self.header.created_us, self.codec, self.clock_rate,
            self.first_ts)).encode())
        for number, piece in enumerate(self.pieces):
            for segment in _segments_reaching(piece, start_us, end_us):
                digest.update(repr((number, piece.first_index, piece.t_start, segment)).encode())
        return digest.hexdigest()[:16]


def _line_us(knots: Sequence[tuple[float, float, float]], times: Sequence[float],
             t: float) -> float:
    """Where RTP time ``t`` lies on a piece's line (``times``: the knots' ``t_from``)."""
    _, offset_us, slope = knots[max(0, bisect.bisect_right(times, t) - 1)]
    return offset_us + t * (1.0 + slope) * 1e6


def _piece_wall(piece: Piece, t: float) -> float:
    line = piece.line()
    return _line_us(line, [knot[0] for knot in line], t)


def _segments_reaching(piece: Piece, start_us: int, end_us: int
                       ) -> Iterator[tuple[float, float, float]]:
    """The knots whose stretch of the wall clock meets ``[start_us, end_us)``."""
    line = piece.line()
    for number, knot in enumerate(line):
        t_from, offset_us, slope = knot
        t_to = line[number + 1][0] if number + 1 < len(line) else max(piece.t_end, t_from)
        if (offset_us + t_from * (1.0 + slope) * 1e6 < end_us
                and offset_us + t_to * (1.0 + slope) * 1e6 >= start_us):
            yield knot


class PieceLocator:
    """Wall-clock time of a packet given its index; indices must come in rising order."""

    def __init__(self, analysis: TrackAnalysis) -> None:
        self.analysis = analysis
        self.starts = [piece.first_index for piece in analysis.pieces]
        self.position = 0
        self.lines = [piece.line() for piece in analysis.pieces]
        self.times = [[knot[0] for knot in line] for line in self.lines]

    def piece(self, index: int) -> Piece:
        pieces = self.analysis.pieces
        if index < self.starts[self.position]:
            self.position = max(0, bisect.bisect_right(self.starts, index) - 1)
        while self.position + 1 < len(pieces) and self.starts[self.position + 1] <= index:
            self.position += 1
        return pieces[self.position]

    def wall(self, index: int, t: float) -> int:
        self.piece(index)
        return round(_line_us(self.lines[self.position], self.times[self.position], t))


@dataclass(slots=True)
class TimedFrame:
    """A codec frame at its place on the wall clock."""

    wall_us: int
    data: bytes
    samples: int = 0
    keyframe: bool = False
    width: int | None = None
    height: int | None = None
    level: int | None = None
    after_gap: str | None = None


def open_track(path: str | Path) -> MjrReader:
    reader = MjrReader(path)
    header = reader.header
    if header.encrypted:
        raise InputError(
            path, "recording is end-to-end encrypted (header e: true): its media cannot be decoded"
        )
    return reader


def _make_depacketizer(codec: str) -> AudioDepacketizer | VideoDepacketizer:
    if codec in ("vp8", "vp9", "h264", "h265", "av1"):
        return video_depacketizer(codec)
    return audio_depacketizer(codec)


class _ExtensionCensus:
    """Which header-extension id carries what, for recordings whose header has no ``x`` map.

    VideoRoom 1.1.2 writes no map, yet packets keep the ids negotiated in the SDP. The MID
    (``sdes:mid``) is a constant short ASCII token; the audio level varies; the video
    orientation uses only the low four bits.
    """

    def __init__(self) -> None:
        self.values: dict[int, set[bytes]] = {}
        # Level histogram (RFC 6464 reading) of every one-byte element, so that whichever id
        # turns out to be the audio level, its levels are already counted.
        self.histograms: dict[int, dict[int, int]] = {}

    def add(self, extensions: dict[int, bytes]) -> None:
        for ext_id, value in extensions.items():
            seen = self.values.setdefault(ext_id, set())
            if len(seen) < 16:
                seen.add(value)
            if len(value) == 1:
                histogram = self.histograms.setdefault(ext_id, {})
                level = value[0] & 0x7F
                histogram[level] = histogram.get(level, 0) + 1

    def guess(self, kind: str) -> int | None:
        candidates = []
        for ext_id, values in self.values.items():
            if any(len(v) != 1 for v in values):
                continue
            ascii_token = all(chr(v[0]).isalnum() for v in values)
            if kind == "audio":
                if len(values) > 1 or not ascii_token:
                    candidates.append((len(values) > 1, ext_id))
            elif all(v[0] < 16 for v in values):
                candidates.append((True, ext_id))
        if not candidates:
            return None
        return max(candidates)[1]


@dataclass
class _FirstPass:
    """What the first pass gathers beside :class:`TrackAnalysis`, located by (packet index, RTP
    seconds): the pieces, and so the wall clock, are only known once every packet is seen."""

    census: _ExtensionCensus = field(default_factory=_ExtensionCensus)
    depay: AudioDepacketizer | VideoDepacketizer | None = None
    raw_gaps: list[tuple[int, float, float, str, int]] = field(default_factory=list)
    keyframes_t: list[tuple[int, float]] = field(default_factory=list)
    res_t: list[tuple[int, float, int, int]] = field(default_factory=list)
    rot_t: list[tuple[int, float, int, bool]] = field(default_factory=list)
    last_end_t: float | None = None
    last_index: int = -1
    #: piece first index -> the packet before it (index, RTP end), for the gap between them
    piece_starts: dict[int, tuple[int, float]] = field(default_factory=dict)


def _compiled_pass_applies(header: MjrHeader) -> bool:
    """Whether :mod:`melter._fastpath` covers this recording (it may still hand it back)."""
    return (
        _fastpath is not None
        and header.variant is Variant.V2
        and header.red_pt is None
        and (header.kind, header.codec) in _COMPILED_CODECS
        and not os.environ.get(PURE_PYTHON_ENV)
    )


def analyze(path: str | Path) -> TrackAnalysis:
    """First pass: the timing model and every fact ``inspect`` reports."""
    reader = open_track(path)
    header = reader.header
    if header.kind == "data":
        return _analyze_data(reader)
    if _compiled_pass_applies(header):
        assert _fastpath is not None
        analysis = _new_analysis(path, header)
        facts = _FirstPass()
        try:
            cut = _fastpath.first_pass(
                analysis,
                facts,
                Piece,
                header.extension_id(URI_AUDIO_LEVEL),
                header.extension_id(URI_VIDEO_ORIENTATION),
            )
        except _fastpath.Fallback:
            pass
        else:
            if cut is not None:
                reader.note_truncated(*cut)
            facts.depay = _make_depacketizer(analysis.codec)
            _fit_timing(analysis, facts, has_arrivals=True)
            return _finish_analysis(analysis, facts, reader)
    analysis = _new_analysis(path, header)
    facts = _first_pass_python(reader, analysis)
    _fit_timing(analysis, facts, has_arrivals=header.variant is Variant.V2)
    return _finish_analysis(analysis, facts, reader)


def _new_analysis(path: str | Path, header: MjrHeader) -> TrackAnalysis:
    return TrackAnalysis(
        Path(path), header, header.codec, CLOCK_RATES.get(header.codec, 90000), OrderStats(), []
    )


def _first_pass_python(reader: MjrReader, analysis: TrackAnalysis) -> _FirstPass:
    path = reader.path
    header = reader.header
    stats = analysis.stats
    facts = _FirstPass()
    census = facts.census
    depay: AudioDepacketizer | VideoDepacketizer | None = None
    ext_level = header.extension_id(URI_AUDIO_LEVEL)
    ext_orient = header.extension_id(URI_VIDEO_ORIENTATION)

    timeline = _TimelineBuilder(analysis, has_arrivals=header.variant is Variant.V2)
    video_groups = _VideoGrouper() if header.kind == "video" else None
    raw_gaps = facts.raw_gaps
    keyframes_t = facts.keyframes_t
    res_t = facts.res_t
    rot_t = facts.rot_t
    piece_starts = facts.piece_starts
    last_end_t: float | None = None
    last_index = -1
    last_rot: tuple[int, bool] | None = None
    last_segment = -1

    def consume(item: OrderedPacket, t: float) -> None:
        nonlocal last_end_t, last_index, last_rot, last_segment
        packet = item.packet
        same_segment = item.segment == last_segment
        if (last_end_t is not None and same_segment and t < last_end_t - JUMP_TOLERANCE_S
                and item.index not in timeline.piece_indices):
            # Well behind the packets before it in sequence order, yet on the arrival clock:
            # its sequence number is damaged. Kept, it would end the track early.
            analysis.outliers.add(item.index)
            return
        lost = item.index - last_index - 1 if last_index >= 0 and same_segment else 0
        if item.index in timeline.piece_indices and last_end_t is not None:
            piece_starts[item.index] = (last_index, last_end_t)
        last_index = item.index
        last_segment = item.segment
        if isinstance(depay, AudioDepacketizer):
            payload = packet.payload
            if header.red_pt is not None and packet.payload_type == header.red_pt:
                try:
                    _, payload = parse_red(payload)
                except ValueError:
                    return
            try:
                samples = depay.samples(payload)
            except ValueError:
                samples = 0
            if last_end_t is not None and item.index not in timeline.piece_indices:
                gap = t - last_end_t
                if gap > 0.0025 and (gap > 0.015 or lost):
                    cause = "loss" if lost else "pause"
                    raw_gaps.append((item.index, last_end_t, gap, cause, lost))
            duration = samples / depay.sample_rate
            analysis.media_us += round(duration * 1e6)
            # Never backwards inside a piece: a packet a little behind the one before it in
            # sequence order (a damaged sequence number) must not end the track early.
            if last_end_t is None or not same_segment or item.index in timeline.piece_indices:
                last_end_t = t + duration
            else:
                last_end_t = max(last_end_t, t + duration)
            analysis.frames += 1
            # An element without a value (two-byte form, length 0) says nothing.
            value = packet.extensions.get(ext_level) if ext_level is not None else None
            if value:
                level, _ = audio_level(value)
                analysis.levels[level] = analysis.levels.get(level, 0) + 1
        else:
            assert video_groups is not None and isinstance(depay, VideoDepacketizer)
            for group in video_groups.add(item, t):
                _scan_picture(group, depay, analysis, keyframes_t, res_t)
            last_end_t = t
            value = packet.extensions.get(ext_orient) if ext_orient is not None else None
            if value:
                rotation = video_rotation(value)
                if rotation != last_rot:
                    rot_t.append((item.index, t, *rotation))
                    last_rot = rotation

    for item in ordered_packets(reader, stats):
        packet = item.packet
        if depay is None:
            codec = resolve_codec(header.codec, packet.payload_type)
            analysis.codec = codec
            analysis.clock_rate = timeline.clock = CLOCK_RATES.get(codec, analysis.clock_rate)
            try:
                depay = _make_depacketizer(codec)
            except UnsupportedError as exc:
                raise InputError(path, str(exc), offset=header.frames_offset) from None
        if packet.extensions:
            census.add(packet.extensions)
        for resolved, t, outlier in timeline.add(item):
            if not outlier:
                consume(resolved, t)
    if depay is None:
        problem = stats.first_invalid_reason
        raise InputError(
            path,
            "recording holds no valid RTP packets"
            + (f" (first problem at {problem})" if problem else ""),
            offset=stats.invalid_offsets[0] if stats.invalid_offsets else header.frames_offset,
        )
    for resolved, t, outlier in timeline.finish():
        if not outlier:
            consume(resolved, t)
    if video_groups is not None:
        assert isinstance(depay, VideoDepacketizer)
        for group in video_groups.flush():
            _scan_picture(group, depay, analysis, keyframes_t, res_t)
        raw_gaps.extend(video_groups.gaps)
        # A video track spans first to last picture, as janus-pp-rec and players measure it.
        last_end_t = video_groups.last_t
    timeline.close_window()
    facts.depay = depay
    facts.last_end_t = last_end_t
    facts.last_index = last_index
    return facts


def _finish_analysis(
    analysis: TrackAnalysis, facts: _FirstPass, reader: MjrReader
) -> TrackAnalysis:
    """Place the first pass's facts on the wall clock once the pieces are fitted."""
    path = reader.path
    header = reader.header
    stats = analysis.stats
    depay = facts.depay
    assert depay is not None
    ext_level = header.extension_id(URI_AUDIO_LEVEL)
    ext_orient = header.extension_id(URI_VIDEO_ORIENTATION)
    analysis.warnings.extend(reader.warnings)
    if analysis.outliers:
        analysis.warnings.append(
            f"{path}: left out {len(analysis.outliers)} packets whose RTP timestamps contradict "
            "their arrival times or sequence numbers (damaged)"
        )
    if stats.invalid:
        analysis.warnings.append(
            f"{path}: {stats.invalid} frames are not valid RTP "
            f"(first at {stats.first_invalid_reason})"
        )
    _bound_clock_jumps(analysis, facts)
    locate = PieceLocator(analysis)
    starts = {piece.first_index for piece in analysis.pieces}
    # A clock piece may be placed before the one read first (a timestamp reset, or a damaged
    # first packet): the track spans from the earliest piece start to the latest piece end.
    analysis.start_us = min(locate.wall(piece.first_index, piece.t_start)
                            for piece in analysis.pieces)
    ends = [locate.wall(index, t) for index, t in facts.piece_starts.values()]
    ends.append(locate.wall(facts.last_index, facts.last_end_t or 0.0))
    analysis.end_us = max(analysis.start_us, *ends)
    gaps = [
        Gap(locate.wall(index, t), round(length * 1e6), cause, lost)
        for index, t, length, cause, lost in facts.raw_gaps
        if index not in starts
    ]
    for piece in analysis.pieces[1:]:
        start = locate.wall(piece.first_index, piece.t_start)
        if piece.first_index in facts.piece_starts:
            prev_index, prev_end = facts.piece_starts[piece.first_index]
            before = locate.wall(prev_index, prev_end)
            gaps.append(Gap(before, max(0, start - before), piece.reason))
        else:
            gaps.append(Gap(start, 0, piece.reason))
    gaps.sort(key=lambda gap: gap.start_us)
    analysis.gap_count = len(gaps)
    analysis.gaps = gaps[:MAX_LISTED]
    analysis.keyframes_us = [locate.wall(i, t) for i, t in facts.keyframes_t]
    analysis.resolutions = [(locate.wall(i, t), w, h) for i, t, w, h in facts.res_t]
    analysis.rotations = [(locate.wall(i, t), d, f) for i, t, d, f in facts.rot_t]
    census = facts.census
    if ext_level is None and header.kind == "audio":
        analysis.audio_level_id = census.guess("audio")
    else:
        analysis.audio_level_id = ext_level
    if ext_orient is None and header.kind == "video":
        analysis.orientation_id = None  # too ambiguous to guess from values alone
    else:
        analysis.orientation_id = ext_orient
    if isinstance(depay, AudioDepacketizer):
        analysis.extradata = depay.extradata()
        analysis.channels = depay.channels
        analysis.sample_rate = depay.sample_rate
        if analysis.audio_level_id is not None and ext_level is None:
            analysis.levels = census.histograms.get(analysis.audio_level_id, {})
    else:
        analysis.extradata = depay.extradata()
    return analysis



def _bound_clock_jumps(analysis: TrackAnalysis, facts: _FirstPass) -> None:
    """No clock jump may open a gap longer than the media before it, unless it is short.

    A clock-jump piece is placed by its arrival times alone. A gap (or overlap) between two
    pieces longer than all the media before it and than :data:`CLOCK_FAULT_MIN_S`, which the
    RTP clock does not show too, is not a pause any sender makes inside one recording: it is a
    damaged or stepped arrival clock, and believing it would stretch a minute of media over
    hours of silence. Such a piece follows the one before it directly. Only media before the
    jump counts, so that the recording read while it grows places the piece the same way.
    """
    pieces = analysis.pieces
    span_us = 0.0
    for prev, piece in pairwise(pieces):
        span_us += 1e6 * max(0.0, prev.t_end - prev.t_start)
        if piece.reason != "clock-jump" or piece.first_index not in facts.piece_starts:
            continue
        gap = _piece_wall(piece, piece.t_start) - _piece_wall(prev, prev.t_end)
        if abs(gap) <= max(span_us, CLOCK_FAULT_MIN_S * 1e6) or _rtp_agrees(
                gap / 1e6, piece.t_start - prev.t_end, analysis.clock_rate):
            continue
        piece.knots = [(t_from, offset_us - gap, slope) for t_from, offset_us, slope
                       in piece.line()]
        piece.offset_us = piece.knots[0][1]
        analysis.warnings.append(
            f"{analysis.path}: an arrival-time jump of {gap / 1e6:.1f} s at packet "
            f"{piece.first_index} is longer than the media before it ({span_us / 1e6:.1f} s) "
            "and the RTP clock shows no such pause: taken as a clock fault, not a gap"
        )


def _rtp_agrees(arrival_gap_s: float, rtp_gap_s: float, clock_rate: int) -> bool:
    """Whether the RTP clock moved as far as the arrival clock across a gap. A pause longer
    than half the 32-bit RTP counter's period reads as a jump backwards once unwrapped; it
    still agrees modulo the period when the sender's clock ran through the pause."""
    if clock_rate <= 0:
        return False
    period = 2**32 / clock_rate
    difference = (arrival_gap_s - rtp_gap_s) % period
    return min(difference, period - difference) <= JUMP_TOLERANCE_S * 2


def _scan_picture(
    group: _PictureGroup,
    depay: AudioDepacketizer | VideoDepacketizer,
    analysis: TrackAnalysis,
    keyframes_t: list[tuple[int, float]],
    res_t: list[tuple[int, float, int, int]],
) -> None:
    assert isinstance(depay, VideoDepacketizer)
    analysis.frames += 1
    try:
        picture = depay.describe([p.packet.payload for p in group.packets])
    except ValueError:
        return
    if picture.keyframe:
        keyframes_t.append((group.packets[0].index, group.t))
    if picture.width and picture.height:
        analysis.max_width = max(analysis.max_width, picture.width)
        analysis.max_height = max(analysis.max_height, picture.height)
        if not res_t or res_t[-1][2:] != (picture.width, picture.height):
            res_t.append((group.packets[0].index, group.t, picture.width, picture.height))


@dataclass
class _PictureGroup:
    ts: int
    t: float
    packets: list[OrderedPacket]
    complete: bool = True


class _VideoGrouper:
    """Packets sharing a timestamp make a picture; a picture is whole when nothing is missing."""

    def __init__(self) -> None:
        self.current: _PictureGroup | None = None
        self.last_index = -1
        self.gaps: list[tuple[int, float, float, str, int]] = []
        self.last_t: float | None = None
        self.frame_interval = 0.0
        self._pending_loss = 0

    def add(self, item: OrderedPacket, t: float) -> list[_PictureGroup]:
        out: list[_PictureGroup] = []
        lost = item.index - self.last_index - 1 if self.last_index >= 0 else 0
        self.last_index = item.index
        current = self.current
        if current is not None and item.packet.timestamp == current.ts:
            if lost:
                current.complete = False
            current.packets.append(item)
            return out
        if current is not None:
            if lost and not current.packets[-1].packet.marker:
                current.complete = False
            out.append(current)
            if self.last_t is not None and t - self.last_t > VIDEO_GAP_S:
                cause = "loss" if lost else "pause"
                self.gaps.append((item.index, self.last_t, t - self.last_t, cause, lost))
            if self.last_t is not None and 0 < t - self.last_t < 1.0:
                self.frame_interval = t - self.last_t
        self.last_t = t
        self.current = _PictureGroup(item.packet.timestamp, t, [item], complete=not lost)
        return out

    def flush(self) -> list[_PictureGroup]:
        if self.current is None:
            return []
        group, self.current = self.current, None
        if not group.packets[-1].packet.marker:
            group.complete = False
        return [group]


class _TimelineBuilder:
    """Extends RTP timestamps, finds clock jumps, and gathers the envelope for the skew fit."""

    def __init__(self, analysis: TrackAnalysis, has_arrivals: bool) -> None:
        self.analysis = analysis
        self.has_arrivals = has_arrivals
        self.clock = analysis.clock_rate
        self.last_ts32: int | None = None
        self.ts_ext = 0
        self.pending: list[tuple[OrderedPacket, float, float]] = []
        self.window_start = 0.0
        self.window_min: tuple[float, float] | None = None
        self.ref: float | None = None
        self.last_t = 0.0
        self.segment = 0
        self.window_count = 0
        self.piece_indices: set[int] = set()
        self.first_checked = False
        #: Packets before this RTP time may set the current piece's offset.
        self.early_end = 0.0

    def extended(self, ts: int) -> int:
        if self.last_ts32 is None:
            self.last_ts32 = ts
            self.analysis.first_ts = ts
            self.ts_ext = ts
            return ts
        delta = (ts - self.last_ts32) & 0xFFFFFFFF
        if delta >= 0x80000000:
            delta -= 0x100000000
        self.last_ts32 = ts
        self.ts_ext += delta
        return self.ts_ext

    def add(self, item: OrderedPacket) -> list[tuple[OrderedPacket, float, bool]]:
        """Packets resolved so far as ``(packet, RTP seconds, outlier)``, in order.

        A packet off the envelope is held until it is clear whether the clock jumped (a new
        piece), the packet was delayed (kept), or its timestamp is damaged (an outlier).
        """
        analysis = self.analysis
        ts = self.extended(item.packet.timestamp)
        t = (ts - analysis.first_ts) / self.clock
        pieces = analysis.pieces
        if not pieces:
            self._new_piece(item.index, 0.0, "start")
            if item.arrival_us is None:
                base = analysis.header.first_packet_us or analysis.header.created_us or 0
                pieces[0].offset_us = float(base)
        new_ssrc = item.segment != self.segment
        self.segment = item.segment
        if item.arrival_us is None or not self.has_arrivals:
            if abs(t - self.last_t) > NO_ARRIVAL_JUMP_S or t < self.last_t - JUMP_TOLERANCE_S:
                prev = pieces[-1]
                new = self._new_piece(item.index, t, "ssrc-change" if new_ssrc else "clock-jump")
                new.offset_us = prev.offset_us + (self.last_t + 0.02 - t) * 1e6
            self.last_t = t
            return [(item, t, False)]
        d = item.arrival_us / 1e6 - t
        if self.ref is None:
            if not self.first_checked:
                self.first_checked = True
                if self._damaged_first(item.arrival_us):
                    analysis.outliers.add(item.index)
                    return [(item, t, True)]
            return [self._normal(item, t, d)]
        if new_ssrc:
            # A new sender's clock owes nothing to the old one: anchor it afresh.
            out = self._resolve(self.pending)
            self.pending = []
            self.close_window()
            self._new_piece(item.index, t, "ssrc-change")
            self.ref = d
            out.append(self._normal(item, t, d))
            return out
        moved = abs(d - self.ref)
        if moved <= JUMP_TOLERANCE_S:
            out = self._resolve(self.pending)
            self.pending = []
            out.append(self._normal(item, t, d))
            return out
        self.pending.append((item, t, d))
        spread = max(p[2] for p in self.pending) - min(p[2] for p in self.pending)
        if spread > JUMP_TOLERANCE_S:
            # Not one consistent new offset: settle the older ones, keep the newest.
            out = self._resolve(self.pending[:-1])
            self.pending = self.pending[-1:]
            return out
        if t - self.pending[0][1] >= JUMP_CONFIRM_S or len(self.pending) >= 200:
            return self._start_piece("clock-jump")
        return []

    def _damaged_first(self, arrival_us: int) -> bool:
        """Whether the first packet's arrival time is damaged: Janus writes the header's
        first-packet time as it writes that packet, so the two agree within any delay. Its
        arrival sets the reference every later packet is judged by, so a damaged one would
        make the rest of the track a clock jump."""
        first_packet_us = self.analysis.header.first_packet_us
        return first_packet_us is not None and abs(arrival_us - first_packet_us) > MAX_DELAY_S * 1e6

    def _new_piece(self, index: int, t: float, reason: str) -> Piece:
        piece = Piece(index, t, reason)
        self.analysis.pieces.append(piece)
        self.piece_indices.add(index)
        return piece

    def _normal(self, item: OrderedPacket, t: float, d: float) -> tuple[OrderedPacket, float, bool]:
        if self.ref is None or d < self.ref:
            self.ref = d
        else:
            # Follow a slow upward drift (skew) without letting one late packet move it.
            self.ref += min(d - self.ref, 0.0005)
        self._envelope(t, d)
        self.last_t = t
        return item, t, False

    def _resolve(
        self, pending: list[tuple[OrderedPacket, float, float]]
    ) -> list[tuple[OrderedPacket, float, bool]]:
        """Held packets that turned out not to start a new piece."""
        out = []
        for item, t, d in pending:
            deviation = d - (self.ref or 0.0)
            # Arriving before its own timestamp, or later than any jitter buffer holds: the
            # timestamp is wrong, not the network. So is a timestamp well behind the packets
            # before it in sequence order that starts no new clock piece.
            damaged = (deviation < -JUMP_TOLERANCE_S or deviation > MAX_DELAY_S
                       or t < self.last_t - JUMP_TOLERANCE_S)
            if damaged:
                self.analysis.outliers.add(item.index)
            out.append((item, t, damaged))
        return out

    def _start_piece(self, reason: str) -> list[tuple[OrderedPacket, float, bool]]:
        first_item, first_t, _ = self.pending[0]
        self.close_window()
        self._new_piece(first_item.index, first_t, reason)
        pending, self.pending = self.pending, []
        self.ref = min(p[2] for p in pending)
        out = []
        for item, t, d in pending:
            self._envelope(t, d)
            self.last_t = t
            out.append((item, t, False))
        return out

    def _envelope(self, t: float, d: float) -> None:
        piece = self.analysis.pieces[-1]
        if piece.lowest is None:
            piece.lowest = (t, d)
            self.early_end = t + OFFSET_SPAN_S
        elif t < self.early_end and d < piece.lowest[1]:
            piece.lowest = (t, d)
        if self.window_min is None or t - self.window_start >= ENVELOPE_WINDOW_S:
            self.close_window()
            self.window_start = t
            self.window_min = (t, d)
            self.window_count = 0
        elif d < self.window_min[1]:
            self.window_min = (t, d)
        self.window_count += 1

    def close_window(self) -> None:
        if self.window_min is not None and self.window_count >= MIN_WINDOW_PACKETS:
            self.analysis.pieces[-1].minima.append(self.window_min)
        self.window_min = None

    def finish(self) -> list[tuple[OrderedPacket, float, bool]]:
        """Settle packets still held at the end of the file."""
        if not self.pending:
            return []
        if self.pending[-1][1] - self.pending[0][1] >= JUMP_CONFIRM_S / 2:
            return self._start_piece("clock-jump")
        out = self._resolve(self.pending)
        self.pending = []
        return out

def _fit_timing(analysis: TrackAnalysis, facts: _FirstPass, has_arrivals: bool) -> None:
    """Each piece's wall-clock line, and the skew over the whole track (a summary: the line
    of each stretch uses the envelope before it only)."""
    pieces = analysis.pieces
    for piece, end in zip(pieces, _piece_ends(pieces, facts), strict=True):
        piece.t_end = end
    if not has_arrivals:
        analysis.skew = 0.0
        for piece in pieces:
            piece.knots = [(piece.t_start, piece.offset_us, 0.0)]
        return
    earlier: list[np.ndarray] = []
    for index, piece in enumerate(pieces):
        envelope = _envelope_points(piece)
        piece.knots = _fit_line(piece, pieces[index - 1] if index else None, earlier, envelope)
        piece.offset_us = piece.knots[0][1]
        earlier.append(envelope)
    analysis.skew = _fit_skew(earlier)


def _piece_ends(pieces: list[Piece], facts: _FirstPass) -> list[float]:
    """RTP seconds where each piece's media ends: the packet before the next piece, and the
    file's last packet."""
    ends = [facts.piece_starts[nxt.first_index][1] if nxt.first_index in facts.piece_starts
            else piece.t_start for piece, nxt in pairwise(pieces)]
    if pieces:
        ends.append(facts.last_end_t if facts.last_end_t is not None else pieces[-1].t_start)
    return ends


def _envelope_points(piece: Piece) -> np.ndarray:
    """The piece's envelope minima as rows ``(t, arrival - t)``."""
    return np.array(piece.minima, dtype=np.float64).reshape(-1, 2)


def _fit_line(piece: Piece, before: Piece | None, earlier: list[np.ndarray],
              envelope: np.ndarray) -> list[tuple[float, float, float]]:
    """A piece's knots, each from what was known before it.

    The first is set by the piece's least-delayed early packet and the skew the pieces before
    it showed. At each later knot the skew is fitted again over the envelope seen so far, and
    the slope until the next knot is that skew plus what closes the distance between the line
    and the envelope (projected to the knot) within one interval: the line stays continuous
    and follows the lower envelope without a step.
    """
    slope = _fit_skew(earlier)
    if piece.lowest is not None:
        t, d = piece.lowest
        knots = [(piece.t_start, 1e6 * (d - slope * t), slope)]
    elif before is not None:
        _, offset_us, slope = before.line()[-1]
        knots = [(piece.t_start, offset_us, slope)]
    else:
        return [(piece.t_start, piece.offset_us, 0.0)]
    known = -1
    skew = slope
    number = 1
    while (knot := piece.t_start + number * KNOT_INTERVAL_S) < piece.t_end:
        seen = envelope[envelope[:, 0] < knot]
        if len(seen) != known:
            known = len(seen)
            skew = _fit_skew([*earlier, seen])
        _, offset_us, slope = knots[-1]
        level = offset_us / 1e6 + slope * knot  # the line's arrival - t at the knot
        early = piece.lowest if len(seen) < MAX_FIT_POINTS else None
        target = _envelope_at(seen[-MAX_FIT_POINTS:], early, skew, knot)
        if target is not None:
            slope = min(MAX_SKEW, max(-MAX_SKEW, skew + (target - level) / KNOT_INTERVAL_S))
        else:
            slope = skew
        knots.append((knot, 1e6 * (level - slope * knot), slope))
        number += 1
    return knots


def _envelope_at(seen: np.ndarray, lowest: tuple[float, float] | None, skew: float,
                 knot: float) -> float | None:
    """The lower envelope of ``arrival - t`` at ``knot``, from the points before it carried
    forward along ``skew``; None without any."""
    levels = seen[:, 1] + skew * (knot - seen[:, 0])
    best = float(levels.min()) if len(levels) else None
    if lowest is not None and lowest[0] < knot:
        early = lowest[1] + skew * (knot - lowest[0])
        best = early if best is None else min(best, early)
    return best


@functools.lru_cache(maxsize=16)
def _pairs(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Every index pair ``i < j`` of ``count`` points."""
    first, second = np.triu_indices(count, 1)
    return first, second


def _latest(envelopes: Sequence[np.ndarray], count: int) -> list[np.ndarray]:
    """The last ``count`` points of the envelopes taken together, still split by piece."""
    out: list[np.ndarray] = []
    for points in reversed(envelopes):
        if count <= 0:
            break
        out.append(points[-count:])
        count -= len(out[-1])
    return out[::-1]


def _fit_skew(envelopes: Sequence[np.ndarray]) -> float:
    """Common slope of the envelope ``arrival - t`` over ``t`` across pieces, over their latest
    :data:`MAX_FIT_POINTS` points.

    Theil–Sen (the median of pairwise slopes within each piece): a few windows whose lowest
    packet was still delayed cannot tilt it, as they would a least-squares line.
    """
    usable = [points for points in _latest(envelopes, MAX_FIT_POINTS) if len(points) >= 3]
    span = sum(float(points[-1, 0] - points[0, 0]) for points in usable)
    if span < MIN_SKEW_SPAN_S:
        return 0.0
    slopes = []
    for points in usable:
        first, second = _pairs(len(points))
        dt = points[second, 0] - points[first, 0]
        kept = dt > 1e-6
        slopes.append((points[second, 1] - points[first, 1])[kept] / dt[kept])
    pooled = np.concatenate(slopes)
    if not len(pooled):
        return 0.0
    middle = len(pooled) // 2
    skew = float(np.partition(pooled, middle)[middle])
    # Beyond MAX_SKEW the "skew" is something else (a stall pattern); do not bend time by it.
    return skew if abs(skew) < MAX_SKEW else 0.0


def _analyze_data(reader: MjrReader) -> TrackAnalysis:
    stats = OrderStats()
    analysis = TrackAnalysis(reader.path, reader.header, reader.header.codec, 1_000_000, stats, [])
    first = last = None
    for frame in reader.frames():
        if len(frame.data) < 8:
            stats.invalid += 1
            continue
        when = int.from_bytes(frame.data[:8], "big", signed=True)
        first = when if first is None else min(first, when)
        last = when if last is None else max(last, when)
        stats.packets += 1
        analysis.frames += 1
    if first is None or last is None:
        raise InputError(reader.path, "data recording holds no messages")
    analysis.pieces = [Piece(0, 0.0, "start")]
    analysis.start_us, analysis.end_us = first, last
    analysis.warnings.extend(reader.warnings)
    return analysis


def data_messages(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """``(wall µs, message)`` for each message of a data-channel recording."""
    reader = open_track(path)
    for frame in reader.frames():
        if len(frame.data) >= 8:
            yield int.from_bytes(frame.data[:8], "big", signed=True), frame.data[8:]


def timed_frames(analysis: TrackAnalysis) -> Iterator[TimedFrame]:
    """Second pass: the track's codec frames with wall-clock times.

    Audio: one frame per packet (the primary block for RED; its redundant blocks fill packets
    lost just before it). Video: one picture per timestamp; a picture with missing packets, and
    every picture after it until the next key frame, is left out so the output decodes
    cleanly — :attr:`TrackAnalysis.warnings` says how many.
    """
    if analysis.compiled_end is not None and _fastpath is not None:
        return _fastpath.timed_frames(analysis, TimedFrame)
    return _timed_frames_python(analysis)


def _timed_frames_python(analysis: TrackAnalysis) -> Iterator[TimedFrame]:
    reader = open_track(analysis.path)
    locate = PieceLocator(analysis)
    header = analysis.header
    timeline = _TimelineBuilder(analysis, has_arrivals=False)
    timeline.clock = analysis.clock_rate
    first_ts = analysis.first_ts
    depay = _make_depacketizer(analysis.codec)
    level_id = analysis.audio_level_id
    stats = OrderStats()
    if isinstance(depay, AudioDepacketizer):
        last_index = -1
        last_segment = -1
        last_end_ts: int | None = None
        outliers = analysis.outliers
        for item in ordered_packets(reader, stats):
            packet = item.packet
            ts = timeline.extended(packet.timestamp)
            if item.index in outliers:
                continue
            payload = packet.payload
            same = item.segment == last_segment
            lost = item.index - last_index - 1 if last_index >= 0 and same else 0
            last_index = item.index
            last_segment = item.segment
            if header.red_pt is not None and packet.payload_type == header.red_pt:
                try:
                    blocks, payload = parse_red(payload)
                except ValueError:
                    continue
                if lost and last_end_ts is not None:
                    for block in blocks:
                        block_ts = ts - block.timestamp_offset
                        if block_ts >= last_end_ts and block.data:
                            samples = depay.samples(block.data)
                            yield TimedFrame(
                                locate.wall(item.index, (block_ts - first_ts) / timeline.clock),
                                depay.frame(block.data),
                                samples,
                            )
                            last_end_ts = block_ts + samples * timeline.clock // depay.sample_rate
            try:
                samples = depay.samples(payload)
            except ValueError:
                continue
            level = None
            if level_id is not None:
                value = packet.extensions.get(level_id)
                if value:
                    level = value[0] & 0x7F
            t = (ts - first_ts) / timeline.clock
            yield TimedFrame(locate.wall(item.index, t), depay.frame(payload), samples, level=level)
            last_end_ts = ts + samples * timeline.clock // depay.sample_rate
        return
    assert isinstance(depay, VideoDepacketizer)
    grouper = _VideoGrouper()
    need_keyframe = True
    dropped = dropped_before_first = 0

    def pictures(groups: list[_PictureGroup]) -> Iterator[TimedFrame]:
        nonlocal need_keyframe, dropped, dropped_before_first
        for group in groups:
            try:
                picture = depay.assemble([p.packet.payload for p in group.packets])
            except ValueError:
                picture = None
            if picture is None or not group.complete:
                need_keyframe = True
                dropped += 1
                continue
            if need_keyframe and not picture.keyframe:
                if analysis.keyframes_us and dropped == dropped_before_first:
                    dropped_before_first += 1
                dropped += 1
                continue
            need_keyframe = False
            yield TimedFrame(
                locate.wall(group.packets[0].index, group.t),
                picture.data,
                keyframe=picture.keyframe,
                width=picture.width,
                height=picture.height,
            )

    for item in ordered_packets(reader, stats):
        ts = timeline.extended(item.packet.timestamp)
        if item.index in analysis.outliers:
            continue
        yield from pictures(grouper.add(item, (ts - first_ts) / timeline.clock))
    yield from pictures(grouper.flush())
    if dropped:
        analysis.warnings.append(
            f"{analysis.path}: left out {dropped} pictures that could not decode cleanly "
            f"({dropped_before_first} before the first key frame, the rest after lost packets "
            "until the next key frame)"
        )
