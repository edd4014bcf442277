"""The compiled passes (``melter._fastpath``) give exactly what the Python passes give.

Every comparison runs :func:`analyze` and :func:`timed_frames` twice on the same file, once
with ``MELTER_PURE_PYTHON`` set, and requires equal analyses (every field: statistics,
pieces, skew, gaps, levels, warnings) and equal frames (times to the microsecond, bytes,
samples, levels, key frames, sizes). The recordings are the real ones and generated ones with
every edit the writer knows, drawn by hypothesis; damaged files must come back to the Python
passes (and so to their salvage rules and warnings).
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from melter import order, track
from melter.mjr.reader import ARRIVAL_WRAP_WINDOW_MS, MAX_RTP_FRAME
from melter.mjr.rtp import URI_AUDIO_LEVEL, URI_VIDEO_ORIENTATION
from melter.track import PURE_PYTHON_ENV, TimedFrame, TrackAnalysis, analyze, timed_frames
from tests.helpers.mjrwriter import Stream, frame_offsets, vp8_pictures

FIXTURES = Path(__file__).parent.parent / "fixtures"
PROPERTY = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
    database=None,
)
pytestmark = pytest.mark.timeout(300)


def _compiled_module() -> Any:
    assert track._fastpath is not None, (
        "melter._fastpath is not built: install with a C compiler (pip install -e .)"
    )
    return track._fastpath


@contextmanager
def _pure_python() -> Iterator[None]:
    before = os.environ.get(PURE_PYTHON_ENV)
    os.environ[PURE_PYTHON_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[PURE_PYTHON_ENV]
        else:
            os.environ[PURE_PYTHON_ENV] = before


def _run(path: Path) -> tuple[dict[str, Any], list[TimedFrame], TrackAnalysis]:
    analysis = analyze(path)
    frames = list(timed_frames(analysis))
    fields = dataclasses.asdict(analysis)
    fields.pop("compiled_end")
    return fields, frames, analysis


def assert_same_as_python(path: Path, compiled: bool = True) -> TrackAnalysis:
    _compiled_module()
    fast_fields, fast_frames, fast = _run(path)
    with _pure_python():
        py_fields, py_frames, py = _run(path)
    assert py.compiled_end is None
    assert (fast.compiled_end is not None) == compiled, fast.warnings
    for name, value in py_fields.items():
        assert fast_fields[name] == value, f"{path}: {name} differs"
    assert len(fast_frames) == len(py_frames)
    for number, (got, want) in enumerate(zip(fast_frames, py_frames, strict=True)):
        assert got == want, f"{path}: frame {number} differs: {got!r:.200} != {want!r:.200}"
    return fast


def test_constants_match_the_python_passes() -> None:
    constants = _compiled_module().CONSTANTS
    for name in (
        "JUMP_TOLERANCE_S", "JUMP_CONFIRM_S", "MAX_DELAY_S", "MIN_WINDOW_PACKETS",
        "ENVELOPE_WINDOW_S", "VIDEO_GAP_S", "OFFSET_SPAN_S",
    ):
        assert constants[name] == getattr(track, name), name
    assert constants["MAX_RTP_FRAME"] == MAX_RTP_FRAME
    assert constants["ARRIVAL_WRAP_WINDOW_MS"] == ARRIVAL_WRAP_WINDOW_MS
    assert constants["RECENT_SIZE"] == order._RECENT


REAL = sorted(FIXTURES.glob("*/*.mjr"))


@pytest.mark.parametrize("path", REAL, ids=[f"{p.parent.name}/{p.name}" for p in REAL])
def test_real_recordings(path: Path) -> None:
    header_codec = analyze(path).codec
    analysis = assert_same_as_python(path, compiled=header_codec in ("opus", "vp8"))
    assert analysis.frames > 100


# -- generated audio ---------------------------------------------------------------------------
SSRC_B = 0x0B0B0B0B
SSRC_C = 0x0C0C0C0C
PAYLOADS = (
    bytes((0xF8, 0xFF, 0xFE)),  # CELT FB 20 ms
    bytes((0xF0, 0xFF, 0xFE)),  # CELT FB 10 ms
    bytes((0x7B, 0x02, 0x11, 0x22)),  # SILK WB 60 ms code 3: two frames (120 ms)
    bytes((0x03,)),  # code 3 without its count byte: not countable
    b"",  # empty payload
)


@st.composite
def audio_streams(draw: st.DrawFn) -> Stream:
    count = draw(st.integers(30, 400))
    rng = random.Random(draw(st.integers(0, 2**32)))
    payloads = [
        PAYLOADS[0] if rng.random() < 0.9 else rng.choice(PAYLOADS) for _ in range(count)
    ]
    stream = Stream.audio(
        payloads,
        960,
        seq=draw(st.integers(0, 0xFFFF)),
        ts=draw(st.integers(0, 0xFFFF_FFFF)),
    )
    interior = st.integers(1, count - 2)

    def present() -> int:
        """A packet still in the stream, neither the first nor the last sent."""
        return draw(st.sampled_from(sorted(p.index for p in stream.packets)[1:-1]))

    edits = draw(
        st.lists(
            st.sampled_from(
                [
                    "pause", "pause_stopped", "drop", "duplicate", "ssrc", "ssrc_back",
                    "ts_jump", "seq_jump", "skew", "jitter", "delay", "stray",
                ]
            ),
            max_size=6,
        )
    )
    for edit in edits:
        at = present()
        if edit == "pause":
            stream.pause(at, draw(st.floats(0.05, 4.0)))
        elif edit == "pause_stopped":
            stream.pause(at, draw(st.floats(0.05, 4.0)), ts_runs=False)
        elif edit == "drop":
            stream.drop(*draw(st.sets(interior, max_size=count // 4)))
        elif edit == "duplicate":
            stream.duplicate(at, draw(st.integers(0, 20)))
        elif edit == "ssrc":
            stream.ssrc_change(at, SSRC_B, ts=draw(st.one_of(st.none(), st.integers(0, 2**32 - 1))))
        elif edit == "ssrc_back":
            stream.ssrc_change(at, SSRC_B)
            stream.ssrc_change(draw(st.integers(at, count - 1)), 0x11223344, seq=1 + at)
        elif edit == "ts_jump":
            stream.ts_jump(at, draw(st.integers(-48000 * 600, 48000 * 600)))
        elif edit == "seq_jump":
            stream.seq_jump(at, draw(st.integers(1, 0xFFFF)))
        elif edit == "skew":
            stream.skew(draw(st.floats(-300, 300)))
        elif edit == "jitter":
            stream.jitter(rng, draw(st.floats(1, 400)))
        elif edit == "delay":
            stream.delay(at, draw(st.integers(1, 300)))
        elif edit == "stray" and len(stream.packets) > at:
            stream.packets[at].ssrc = SSRC_C
    if draw(st.booleans()):
        stream.shuffle(rng, draw(st.integers(2, 40)))
    levels = draw(st.sampled_from(["none", "mapped", "unmapped", "two-byte"]))
    if levels != "none":
        stream.audio_levels(
            draw(st.integers(1, 14)),
            [rng.randrange(128) for _ in range(7)],
            two_byte=levels == "two-byte",
            mapped=levels != "unmapped",
        )
        if draw(st.booleans()):
            stream.extension(draw(st.integers(1, 14)), b"a0")  # a MID-like element
    if draw(st.booleans()):
        stream.set_csrcs([1, 2, 3])
    if draw(st.booleans()):
        stream.set_padding(draw(st.integers(1, 8)))
    return stream


@contextmanager
def _written(stream: Stream) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as folder:
        yield stream.write(Path(folder) / "generated.mjr")


@PROPERTY
@given(audio_streams())
def test_generated_audio(stream: Stream) -> None:
    with _written(stream) as path:
        assert_same_as_python(path)


# -- generated video ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pictures() -> tuple[Any, ...]:
    return vp8_pictures(60, size=(160, 120), gop=20)


@PROPERTY
@given(data=st.data())
def test_generated_video(pictures: tuple[Any, ...], data: st.DataObject) -> None:
    draw = data.draw
    mtu = draw(st.sampled_from([1200, 300, 120]))
    stream = Stream.vp8(
        pictures, mtu=mtu, seq=draw(st.integers(0, 0xFFFF)), ts=draw(st.integers(0, 2**32 - 1))
    )
    count = len(stream.packets)
    rng = random.Random(draw(st.integers(0, 2**32)))
    interior = st.integers(1, count - 2)

    def present() -> int:
        return draw(st.sampled_from(sorted(p.index for p in stream.packets)[1:-1]))

    for edit in draw(
        st.lists(st.sampled_from(["drop", "duplicate", "pause", "ssrc", "ts_jump", "jitter"]),
                 max_size=4)
    ):
        at = present()
        if edit == "drop":
            stream.drop(*draw(st.sets(interior, max_size=6)))
        elif edit == "duplicate":
            stream.duplicate(at, draw(st.integers(0, 10)))
        elif edit == "pause":
            stream.pause(at, draw(st.floats(0.1, 3.0)))
        elif edit == "ssrc":
            stream.ssrc_change(at, SSRC_B)
        elif edit == "ts_jump":
            stream.ts_jump(at, draw(st.integers(-90000 * 60, 90000 * 60)))
        elif edit == "jitter":
            stream.jitter(rng, draw(st.floats(1, 200)))
    if draw(st.booleans()):
        stream.shuffle(rng, draw(st.integers(2, 20)))
    if draw(st.booleans()):
        stream.orientation(
            draw(st.integers(1, 14)), draw(st.sampled_from([0, 90, 180, 270])),
            flip=draw(st.booleans()), since=present(), mapped=draw(st.booleans()),
        )
    with _written(stream) as path:
        assert_same_as_python(path)


# -- damage goes to the Python passes ----------------------------------------------------------
def _audio(tmp_path: Path) -> Path:
    return Stream.audio([PAYLOADS[0]] * 200, 960).write(tmp_path / "a.mjr")


# Bytes of the last frame written: into its body (10 bytes of prefix), into its prefix.
@pytest.mark.parametrize("kept", [17, 3])
def test_a_file_cut_inside_its_last_frame_is_read_to_that_frame(
        tmp_path: Path, kept: int) -> None:
    """A recording Janus is still writing (or one a crash cut) ends inside a frame: the
    compiled pass reads up to that frame, as the Python pass does, and says so the same way;
    what it planned stays what its second pass reads once the file has grown."""
    path = _audio(tmp_path)
    whole = path.read_bytes()
    last = frame_offsets(path)[-1]
    path.write_bytes(whole[:last + kept])
    analysis = assert_same_as_python(path)
    assert analysis.frames == 199 and analysis.compiled_end == last
    what = f"a {len(whole) - last - 10}-byte frame" if kept > 10 else "a frame header"
    assert [w for w in analysis.warnings if "file ends inside" in w] == [
        f"{path}: file ends inside {what} at byte {last}; kept everything before it"]
    before = list(timed_frames(analysis))
    path.write_bytes(whole)  # the recording grows
    assert list(timed_frames(analysis)) == before
    assert len(before) == 199


def test_damaged_frame_falls_back(tmp_path: Path) -> None:
    path = _audio(tmp_path)
    raw = bytearray(path.read_bytes())
    at = frame_offsets(path)[100]
    raw[at : at + 6] = b"XXXXXX"  # the frame prefix
    path.write_bytes(bytes(raw))
    analysis = assert_same_as_python(path, compiled=False)
    assert any("skipped" in warning for warning in analysis.warnings)


def test_invalid_rtp_falls_back(tmp_path: Path) -> None:
    stream = Stream.audio([PAYLOADS[0]] * 200, 960)
    path = stream.write(tmp_path / "a.mjr")
    raw = bytearray(path.read_bytes())
    raw[frame_offsets(path)[100] + 10] = 0x40  # RTP version 2 -> 1
    path.write_bytes(bytes(raw))
    analysis = assert_same_as_python(path, compiled=False)
    assert analysis.stats.invalid == 1


def test_second_pass_reads_what_the_first_read(tmp_path: Path) -> None:
    """A file that grows after the first pass (Janus still writing) gives the same frames."""
    path = _audio(tmp_path)
    analysis = analyze(path)
    assert analysis.compiled_end == path.stat().st_size
    before = list(timed_frames(analysis))
    more = Stream.audio([PAYLOADS[0]] * 50, 960, seq=201, ts=200 * 960)
    with path.open("ab") as handle:
        for frame in more.write(tmp_path / "b.mjr").read_bytes()[analysis.header.frames_offset:]:
            handle.write(bytes((frame,)))
    assert list(timed_frames(analysis)) == before
    assert len(before) == 200


def test_pieces_out_of_index_order(tmp_path: Path) -> None:
    """A sequence restart right after the first packet, with the restart's first packets
    reordered, starts the second piece at a lower index than the first (index -2 < 0): the
    wall-clock lookup must follow pieces in list order as the Python pass does."""
    stream = Stream.audio([PAYLOADS[0]] * 60, 960, seq=3000)
    stream.seq_jump(1, -3500)
    stream.pause(1, 4.8, ts_runs=False)
    stream.permute([0, 3, 1, 2, 5, 7, 4, 6, *range(8, 60)])
    path = stream.write(tmp_path / "restart.mjr")
    analysis = assert_same_as_python(path)
    starts = [piece.first_index for piece in analysis.pieces]
    assert len(starts) == 2 and starts[1] < starts[0], starts
    # The sender's clock stopped during the pause: the pieces' offsets differ by it.
    offsets = [piece.offset_us for piece in analysis.pieces]
    assert abs(offsets[1] - offsets[0] - 4_800_000) < 1_000, offsets


@pytest.mark.parametrize("kind", ["audio level", "orientation"])
def test_elements_without_a_value(tmp_path: Path, pictures: tuple[Any, ...], kind: str) -> None:
    """RFC 8285's two-byte form allows an element of length 0: it carries no level or
    rotation, and the recording reads as if the element were absent."""
    if kind == "audio level":
        stream = Stream.audio([PAYLOADS[0]] * 100, 960)
        stream.extension(3, lambda p: b"" if p.index % 2 else bytes((0x80 | 40,)),
                         two_byte=True, uri=URI_AUDIO_LEVEL)
    else:
        stream = Stream.vp8(pictures)
        stream.extension(3, lambda p: b"" if p.index % 2 else bytes((0x01,)),
                         two_byte=True, uri=URI_VIDEO_ORIENTATION)
    analysis = assert_same_as_python(stream.write(tmp_path / "empty-elements.mjr"))
    if kind == "audio level":
        assert analysis.levels == {40: 50}
    else:
        assert [(degrees, flip) for _, degrees, flip in analysis.rotations] == [(90, False)]
