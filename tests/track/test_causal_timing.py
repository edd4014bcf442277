"""A recording read while Janus still writes it is timed as the whole file will be.

Janus appends packets as they arrive, so a growing recording is a byte prefix of the final
file. Every recording here — the real ones in ``tests/fixtures`` and generated ones with skew,
jitter, loss, reordering, duplicates, pauses, stopped clocks, timestamp jumps and sender
changes — is cut at several arrival times ``T`` (the frames that had arrived, and sometimes
the first bytes of the next), and the cut and the whole file must give the very same frames,
to the microsecond and the byte, wherever either places a frame before ``T - STABLE_AFTER_S``;
their timing keys must agree for every window that ends by then.

The line is causal yet accurate: a generated track whose clock runs 80 ppm fast for ten minutes
is placed within 2 ms of the times its packets were sent, and on the real recordings the line
stays within 2.5 ms of a fit over the whole file.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from melter.track import (
    KNOT_INTERVAL_S,
    OFFSET_SPAN_S,
    STABLE_AFTER_S,
    TimedFrame,
    TrackAnalysis,
    analyze,
    timed_frames,
)
from tests.helpers.mjrwriter import Stream, vp8_pictures
from tests.helpers.prefixes import Arrivals, arrivals, cut_at
from tests.track.test_fastpath import assert_same_as_python

FIXTURES = Path(__file__).parent.parent / "fixtures"
REAL = sorted(FIXTURES.glob("*/*.mjr"))
#: Where each recording is cut, as fractions of its span of arrivals, and how many bytes of
#: the next frame each cut holds (a frame header cut short, a payload cut short, none).
CUTS = ((0.2, 0), (0.35, 5), (0.5, 0), (0.65, 13), (0.8, 0))
HORIZON_US = round(STABLE_AFTER_S * 1e6)
WINDOW_US = 2_000_000
CELT = bytes((0xF8, 0xFF, 0xFE))  # a 20 ms CELT frame, as DTX senders emit
SSRC_B = 0x0B0B0B0B

pytestmark = pytest.mark.timeout(300)


def _audio(seconds: float) -> Stream:
    return Stream.audio([CELT] * round(seconds * 50), 960, seq=65000, ts=4_294_000_000)


def skewed_jittery() -> Stream:
    return _audio(95).skew(80).jitter(random.Random(1), 15).shuffle(random.Random(2), 5)


def paused_and_lossy() -> Stream:
    stream = _audio(85)
    stream.pause(1000, 3.0)  # the RTP clock runs on: a gap, no piece
    stream.pause(2300, 5.0, ts_runs=False)  # the sender's clock stopped: a new piece
    stream.drop(*random.Random(3).sample(range(1, 4000), 60))
    stream.duplicate(1500, 4).delay(3100, 3)
    return stream.skew(-150).jitter(random.Random(4), 8)


def jumps_and_new_sender() -> Stream:
    stream = _audio(125)
    stream.ssrc_change(2000, SSRC_B, seq=9, ts=77_000)
    stream.ts_jump(4100, -48000 * 600)
    return stream.skew(200).jitter(random.Random(5), 5)


def video_at_ten() -> Stream:
    pictures = vp8_pictures(20, size=(160, 120), fps=10, gop=20)
    stream = Stream.vp8([pictures[n % 20] for n in range(750)], mtu=300, fps=10)
    stream.pause(len(stream) // 3, 2.0)
    stream.ssrc_change(2 * len(stream) // 3, SSRC_B)
    return stream.skew(-60).jitter(random.Random(6), 20)


def sparse_video() -> Stream:
    """One small picture a second, as a still screen share sends: no envelope window ever
    holds enough packets, so the offset and the knots rest on the early packets alone."""
    pictures = vp8_pictures(10, size=(64, 48), fps=1, gop=10)
    stream = Stream.vp8([pictures[n % 10] for n in range(80)], fps=1)
    return stream.skew(40).jitter(random.Random(7), 10)


GENERATED: dict[str, Callable[[], Stream]] = {
    "skewed-jittery": skewed_jittery,
    "paused-and-lossy": paused_and_lossy,
    "jumps-and-new-sender": jumps_and_new_sender,
    "video-at-ten": video_at_ten,
    "sparse-video": sparse_video,
}


def _before(frames: list[TimedFrame], limit_us: int) -> list[TimedFrame]:
    return [frame for frame in frames if frame.wall_us < limit_us]


def assert_prefixes_agree(path: Path, work: Path) -> int:
    """Cut ``path`` at each of :data:`CUTS` and compare; how many frames were compared."""
    facts: Arrivals = arrivals(path)
    whole = analyze(path)
    frames = list(timed_frames(whole))
    compared = 0
    for number, (fraction, partial) in enumerate(CUTS):
        at = facts.first_us + round((facts.last_us - facts.first_us) * fraction)
        (work / f"cut{number}").mkdir()
        prefix = cut_at(path, at, work / f"cut{number}" / path.name, partial, facts)
        assert prefix is not None
        grown = analyze(prefix.path)
        limit = prefix.end_us - HORIZON_US
        where = f"{path.name} cut at {fraction:.0%} (+{partial} bytes)"
        got = _before(list(timed_frames(grown)), limit)
        want = _before(frames, limit)
        assert len(got) == len(want), where
        for index, (a, b) in enumerate(zip(got, want, strict=True)):
            assert a == b, f"{where}: frame {index}: {a.wall_us} != {b.wall_us}"
        compared += len(want)
        assert_keys_agree(grown, whole, prefix.end_us, where)
    return compared


def assert_keys_agree(grown: TrackAnalysis, whole: TrackAnalysis, end_us: int,
                      where: str) -> None:
    """Equal keys for every window that closes ``STABLE_AFTER_S`` before the prefix's end;
    different ones for a window the prefix has not reached."""
    limit = end_us - HORIZON_US
    start = min(grown.start_us, whole.start_us)
    windows = [(s, s + WINDOW_US) for s in range(start, limit - WINDOW_US + 1, WINDOW_US)]
    windows += [(start, limit)] if limit > start else []
    for first, last in windows:
        assert grown.timing_key(first, last) == whole.timing_key(first, last), (
            f"{where}: window {first - start} .. {last - start} µs")
    if whole.end_us > end_us + HORIZON_US + 1_000_000:
        later = (end_us + HORIZON_US, whole.end_us)
        assert grown.timing_key(*later) != whole.timing_key(*later), where


@pytest.mark.parametrize("path", REAL, ids=[f"{p.parent.name}/{p.name[-14:]}" for p in REAL])
def test_real_recordings_read_while_growing(path: Path, tmp_path: Path) -> None:
    assert assert_prefixes_agree(path, tmp_path) > 50


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_recordings_read_while_growing(name: str, tmp_path: Path) -> None:
    path = GENERATED[name]().write(tmp_path / f"{name}.mjr")
    analysis = analyze(path)
    assert max(len(piece.knots) for piece in analysis.pieces) >= 2, "no knot exercised"
    assert assert_prefixes_agree(path, tmp_path) > 50


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_compiled_lines_equal_the_python_ones(name: str, tmp_path: Path) -> None:
    """The knots are found once, in Python; the compiled second pass follows them as the
    Python one does, across pieces and knots."""
    path = GENERATED[name]().write(tmp_path / f"{name}.mjr")
    analysis = assert_same_as_python(path)
    assert sum(len(piece.knots) for piece in analysis.pieces) >= 3


def test_a_skewed_clock_is_followed_within_2_ms(tmp_path: Path) -> None:
    """Ten minutes of a sender 80 ppm off the Janus host (48 ms in all), 10 ms of jitter:
    before the first knot the line cannot know the skew (80 ppm of 30 s: 2.4 ms, plus the
    millisecond arrival stamps); from the second knot on it is within 2 ms of the truth."""
    stream = _audio(600).skew(80).jitter(random.Random(11), 10)
    sent = {packet.index: packet.sent_us for packet in stream.packets}
    analysis = analyze(stream.write(tmp_path / "skewed.mjr"))
    errors = [frame.wall_us - sent[index]
              for index, frame in enumerate(timed_frames(analysis))]
    assert len(errors) == 30_000
    assert abs(analysis.skew_ppm - 80) < 0.5
    first_knot = round(KNOT_INTERVAL_S * 50)
    assert max(abs(e) for e in errors[:first_knot]) <= 80e-6 * KNOT_INTERVAL_S * 1e6 + 1_200
    assert max(abs(e) for e in errors[2 * first_knot:]) <= 2_000
    assert max(abs(e) for e in errors[-15_000:]) <= 2_000
    assert len(analysis.pieces[0].knots) == 20


def _whole_file_fit(analysis: TrackAnalysis, t: float, piece_number: int) -> float:
    """Where a fit over the whole piece puts ``t``: the summary skew through the lowest
    point of the piece's envelope (what the timing was before it was made causal)."""
    piece = analysis.pieces[piece_number]
    points = piece.minima or ([piece.lowest] if piece.lowest else [])
    offset = min(d - analysis.skew * at for at, d in points)
    return 1e6 * (offset + t * (1 + analysis.skew))


def _line_at(analysis: TrackAnalysis, t: float, piece_number: int) -> float:
    """Where the causal line of a piece puts ``t`` (µs, unrounded)."""
    piece = analysis.pieces[piece_number]
    _, offset, slope = ([k for k in piece.knots if k[0] <= t] or piece.knots[:1])[-1]
    return offset + t * (1 + slope) * 1e6


@pytest.mark.parametrize("path", REAL, ids=[f"{p.parent.name}/{p.name[-14:]}" for p in REAL])
def test_real_recordings_stay_on_their_whole_file_fit(path: Path) -> None:
    """At every tenth of a second of each piece, the line is within 2.5 ms of the fit over
    the whole file, and never earlier than it by more than the fit's own rounding."""
    analysis = analyze(path)
    differences = []
    for number, piece in enumerate(analysis.pieces):
        steps = max(2, round((piece.t_end - piece.t_start) * 10))
        for step in range(steps + 1):
            t = piece.t_start + (piece.t_end - piece.t_start) * step / steps
            differences.append(_line_at(analysis, t, number)
                               - _whole_file_fit(analysis, t, number))
    assert max(differences) <= 2_500, max(differences)
    assert min(differences) >= -1_000, min(differences)


def test_an_offset_is_fixed_by_the_first_seconds(tmp_path: Path) -> None:
    """A packet that arrives with less delay than any before, after the first
    ``OFFSET_SPAN_S``, leaves the start where it was; from the first knot the line heads for
    the envelope it showed, reaching it at the next knot."""
    stream = _audio(70)
    late = round((OFFSET_SPAN_S + 1) * 50)
    for packet in stream.packets:
        if packet.index != late:
            packet.arrival_us += 15_000
    analysis = analyze(stream.write(tmp_path / "late-low.mjr"))
    piece = analysis.pieces[0]
    assert analysis.start_us == stream.first_sent_us + 15_000
    assert [knot[0] for knot in piece.knots] == [0.0, KNOT_INTERVAL_S, 2 * KNOT_INTERVAL_S]
    assert [knot[2] for knot in piece.knots] == pytest.approx([0.0, -5e-4, 0.0], abs=1e-8)
    frames = list(timed_frames(analysis))
    placed = [frame.wall_us - packet.sent_us for frame, packet in zip(
        frames, sorted(stream.packets, key=lambda p: p.index), strict=True)]
    assert placed[: 30 * 50] == [15_000] * 1500
    assert placed[60 * 50:] == [0] * 500


def test_the_line_of_a_real_recording() -> None:
    """M's camera in the turn-taking meeting, pinned: its least-delayed packet of the first
    three seconds (0.87 s in) sets the start; at the 30 s knot the line turns down by 103 ppm
    (a skew of -22 ppm plus 2.4 ms to recover in 30 s) onto the envelope found since."""
    path = FIXTURES / "dev-turn-taking-vp8" / "videoroom-2003-user-523-1795702467442016-video-1.mjr"
    analysis = analyze(path)
    first = analysis.header.first_packet_us
    assert (analysis.start_us - first, analysis.end_us - first) == (-9_666, 34_389_882)
    assert round(analysis.skew_ppm, 6) == -22.024835
    [piece] = analysis.pieces
    assert piece.lowest == pytest.approx((0.8666666666666667, 1795702467.4814935), abs=1e-9)
    assert [(t, offset - first) for t, offset, _ in piece.knots] == [(0.0, -9666.5),
                                                                     (30.0, -6586.5)]
    assert [slope * 1e6 for _, _, slope in piece.knots] == pytest.approx(
        [0.0, -102.66785887751286], rel=1e-12)
