"""One damaged arrival time in a real recording leaves the track as long as it was.

Janus stores each packet's arrival as a u32 count of milliseconds. Changing the top byte of one
packet's count moves that packet about 49 days on; before, the reader took the next packet for a
wrap of the counter (every later packet 49.7 days on) and a damaged first packet became the
reference the whole track was judged by: a 49-day track, and a converter that built 49 days
of silence until memory ran out. Both passes (compiled and Python) must drop the one packet
with a warning and keep the track's times.
"""

from __future__ import annotations

from pathlib import Path

import av
import pytest

from melter.mjr.reader import MjrReader
from melter.track import PURE_PYTHON_ENV, analyze
from tests.helpers.mjrwriter import Stream, frame_offsets, make_header, write_mjr
from tests.meeting.test_meeting_limits import melter

FIXTURES = Path(__file__).parent.parent / "fixtures"
THREE, TWO = FIXTURES / "dev-three-party-vp8", FIXTURES / "dev-two-party-h264"
RECORDINGS = {
    "opus": THREE / "videoroom-2001-user-501-1795700513534356-audio-0.mjr",
    "vp8": THREE / "videoroom-2001-user-501-1795700513534447-video-1.mjr",
    "h264": TWO / "videoroom-2002-user-511-1795700544681330-video-1.mjr",
}
WHERE = ["first", "second", "middle", "last"]


def damaged_copy(source: Path, where: str, folder: Path) -> tuple[Path, int]:
    """``source`` with the top byte of one packet's arrival time inverted; the byte's offset."""
    data = bytearray(source.read_bytes())
    starts = frame_offsets(source)
    index = {"first": 0, "second": 1, "middle": len(starts) // 2, "last": len(starts) - 1}[where]
    offset = starts[index] + 4
    data[offset] ^= 0xFF
    path = folder / f"{where}-{source.name}"
    path.write_bytes(data)
    return path, offset


def test_one_wild_arrival_is_not_a_counter_wrap(tmp_path: Path) -> None:
    packets = Stream.opus(0.1).packets
    written = [0, 20, 0xFF00_0028, 60, 80]
    path = write_mjr(tmp_path / "spike.mjr", make_header(),
                     [(ms, p.to_bytes()) for ms, p in zip(written, packets, strict=True)])
    assert [f.arrival_ms for f in MjrReader(path).frames()] == written


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("codec", sorted(RECORDINGS))
def test_one_damaged_arrival_keeps_the_track_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, codec: str, where: str, compiled: bool
) -> None:
    if not compiled:
        monkeypatch.setenv(PURE_PYTHON_ENV, "1")
    source = RECORDINGS[codec]
    clean = analyze(source)
    path, offset = damaged_copy(source, where, tmp_path)
    damaged = analyze(path)
    moved_start = damaged.start_us - clean.start_us
    moved_end = damaged.end_us - clean.end_us
    assert abs(moved_start) <= 100_000 and abs(moved_end) <= 100_000, (moved_start, moved_end)
    assert abs(damaged.frames - clean.frames) <= 1
    assert all(gap.length_us <= 5_000_000 for gap in damaged.gaps), damaged.gaps
    assert any(str(path) in warning and "damaged" in warning for warning in damaged.warnings), (
        offset, damaged.warnings)


def _convert_peak_kib(source: Path, output: Path) -> int:
    """``melter convert source -o output`` in a capped child; its peak resident memory (KiB)."""
    result = melter("convert", source, "-o", output, peak=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stderr.split("PEAK")[-1].split()[0])


@pytest.mark.parametrize("codec", ["opus", "vp8"])
def test_converting_a_damaged_recording_costs_what_the_clean_one_does(tmp_path: Path,
                                                                      codec: str) -> None:
    source = RECORDINGS[codec]
    suffix = ".opus" if codec == "opus" else ".webm"
    clean_out = tmp_path / f"clean{suffix}"
    clean_peak = _convert_peak_kib(source, clean_out)
    for where in ("first", "middle"):
        path, _ = damaged_copy(source, where, tmp_path)
        out = tmp_path / f"{where}{suffix}"
        peak = _convert_peak_kib(path, out)
        with av.open(str(clean_out)) as a, av.open(str(out)) as b:
            clean_s, damaged_s = a.duration / 1e6, b.duration / 1e6
        print(f"\n{codec} {where}: {damaged_s:.3f} s (clean {clean_s:.3f} s), peak RSS "
              f"{peak / 1024:.0f} MiB (clean {clean_peak / 1024:.0f} MiB)")
        assert abs(damaged_s - clean_s) <= 1.0
        assert peak <= clean_peak * 1.2 + 20 * 1024


@pytest.mark.parametrize("value", ["1e999", "-1e999", "NaN", "1" + "0" * 30])
def test_a_header_time_beyond_any_date_is_ignored(tmp_path: Path, value: str) -> None:
    """``s``/``u`` that no clock gives (infinite, not a number, 10^30 µs) are left out of the
    header, as a missing one is: the recording still reads."""
    packets = Stream.opus(0.2).packets
    body = f'{{"t":"a","c":"opus","s":{value},"u":{value}}}'.encode()
    path = write_mjr(tmp_path / "h.mjr", body,
                     [(20 * n, p.to_bytes()) for n, p in enumerate(packets)])
    header = MjrReader(path).header
    assert header.created_us is None and header.first_packet_us is None
    assert analyze(path).frames == len(packets)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_a_damaged_sequence_number_does_not_end_the_track_early(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compiled: bool) -> None:
    """One packet's sequence number 2 000 ahead sorts it last, while its timestamp and arrival
    say it belongs 0.7 s earlier: it is left out, and the track keeps its end."""
    if not compiled:
        monkeypatch.setenv(PURE_PYTHON_ENV, "1")
    stream = Stream.opus(3.0)
    clean = analyze(stream.write(tmp_path / "clean.mjr"))
    stream.packets[115].seq = (stream.packets[115].seq + 2000) & 0xFFFF
    damaged = analyze(stream.write(tmp_path / "seq.mjr"))
    assert damaged.end_us == clean.end_us
    assert len(damaged.outliers) == 1
    assert all(clean.start_us <= g.start_us <= clean.end_us for g in damaged.gaps)


def shifted_copy(source: Path, shift_ms: int, folder: Path) -> Path:
    """``source`` with every arrival time from the middle packet on moved ``shift_ms`` later,
    as a stepped host clock or damage to many packets would write them."""
    data = bytearray(source.read_bytes())
    starts = frame_offsets(source)
    for start in starts[len(starts) // 2:]:
        arrival = int.from_bytes(data[start + 4:start + 8], "big")
        data[start + 4:start + 8] = ((arrival + shift_ms) & 0xFFFF_FFFF).to_bytes(4, "big")
    path = folder / f"shift{shift_ms}-{source.name}"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
@pytest.mark.parametrize("codec", ["opus", "vp8"])
def test_no_arrival_jump_opens_a_gap_longer_than_the_files_own_media(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, codec: str, compiled: bool) -> None:
    """Ten hours between two halves of a recording that hold seconds of media is a clock fault:
    the halves stay together. A jump shorter than the media is a pause, and stays one."""
    if not compiled:
        monkeypatch.setenv(PURE_PYTHON_ENV, "1")
    source = RECORDINGS[codec]
    clean = analyze(source)
    media_s = (clean.end_us - clean.start_us) / 1e6
    far = analyze(shifted_copy(source, 10 * 3600 * 1000, tmp_path))
    print(f"\n{codec}: clean {media_s:.3f} s, 10 h jump -> "
          f"{(far.end_us - far.start_us) / 1e6:.3f} s")
    assert abs((far.end_us - far.start_us) - (clean.end_us - clean.start_us)) <= 1_000_000
    longest = max((gap.length_us for gap in clean.gaps), default=0)
    assert all(gap.length_us <= longest + 100_000 for gap in far.gaps), far.gaps
    assert any("clock fault" in warning for warning in far.warnings), far.warnings
    pause_ms = int(media_s * 1000) // 2
    paused = analyze(shifted_copy(source, pause_ms, tmp_path))
    stretch = (paused.end_us - paused.start_us) - (clean.end_us - clean.start_us)
    assert abs(stretch - pause_ms * 1000) <= 100_000, stretch
    assert not any("clock fault" in warning for warning in paused.warnings)
