"""Edge cases of MJR input, each checked with numbers: counts, durations, offsets.

Recordings are generated with :mod:`mjrwriter` so every expected value is known exactly:
Opus packets last 20 ms unless said otherwise and the first packet arrives at ``T0_US``.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

import melter.convert as convert_module
from melter.convert import convert
from melter.errors import InputError, MelterError, UnsupportedError
from melter.mjr.reader import EmptyRecordingError, MjrReader, Variant
from melter.mjr.rtp import RtpPacket
from melter.order import OrderStats, ordered_packets
from melter.track import analyze, timed_frames
from tests.helpers.mediacheck import decode_audio
from tests.helpers.mjrwriter import (
    LEGACY,
    T0_US,
    URI_AUDIO_LEVEL,
    URI_MID,
    V1,
    V2,
    Stream,
    data_recording,
    extension_block,
    frame_bytes,
    frame_offsets,
    g711_payloads,
    g722_payloads,
    h264_pictures,
    header_bytes,
    l16_payloads,
    make_header,
    opus_packets,
    opus_silence_packet,
    red_payload,
    rtp_bytes,
    vp8_pictures,
    write_mjr,
)

pytestmark = pytest.mark.timeout(120)

MS = 1000
TOL_US = 40 * MS  # wall-clock tolerance of durations
SSRC_B = 0xDEADBEEF


# -- helpers -----------------------------------------------------------------------------------
def melter_cmd() -> list[str]:
    exe = shutil.which("melter")
    return [exe] if exe else [sys.executable, "-m", "melter.cli"]


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*melter_cmd(), *map(str, args)], capture_output=True, text=True, timeout=60
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], path: Path, offset: int):
    assert "Traceback" not in result.stderr + result.stdout
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"melter: error: {path} at byte {offset}: "), lines[0]


def ffmpeg_errors(path: Path) -> str:
    """What ``ffmpeg -v error`` prints while decoding the whole file (empty when clean)."""
    result = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "null", "-"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr.strip()


def ffprobe_streams(path: Path) -> list[dict]:
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-show_streams", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)["streams"]


def decoded_video_frames(path: Path) -> list[tuple[int, int]]:
    with av.open(str(path)) as container:
        return [(f.width, f.height) for f in container.decode(container.streams.video[0])]


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples.astype(np.float64))))) if samples.size else 0.0


def tone_hz(samples: np.ndarray, rate: int) -> float:
    """Dominant frequency from the FFT peak (interpolated over the neighbouring bins)."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    peak = int(np.argmax(spectrum[1:])) + 1
    a, b, c = spectrum[peak - 1], spectrum[peak], spectrum[peak + 1]
    shift = 0.5 * (a - c) / (a - 2 * b + c) if (a - 2 * b + c) else 0.0
    return (peak + shift) * rate / len(samples)


def ordered_seqs(path: Path) -> tuple[list[int], OrderStats]:
    stats = OrderStats()
    seqs = [item.packet.sequence_number for item in ordered_packets(MjrReader(path), stats)]
    return seqs, stats


def gaps_rel(analysis) -> list[tuple[int, int, str, int]]:
    return [(g.start_us - T0_US, g.length_us, g.cause, g.packets_lost) for g in analysis.gaps]


@pytest.fixture
def opus2(tmp_path: Path) -> Path:
    """2 s of Opus (100 packets of 20 ms)."""
    return Stream.opus(2.0).write(tmp_path / "opus2.mjr")


# -- variants and header -----------------------------------------------------------------------
@pytest.mark.parametrize("variant", [LEGACY, V1, V2])
def test_every_variant_reads_the_same_packets(tmp_path: Path, variant: str) -> None:
    stream = Stream.opus(1.0)
    path = stream.write(tmp_path / "a.mjr", variant=variant)
    reader = MjrReader(path)
    header = reader.header
    assert header.variant is Variant(variant)
    assert (header.kind, header.codec) == ("audio", "opus")
    if variant == LEGACY:
        assert header.frames_offset == 15  # magic, u16 5, "audio"
        assert header.first_packet_us is None
    else:
        body = json.dumps(stream.header(), separators=(",", ":")).encode()
        assert header.frames_offset == 10 + len(body)
        assert header.first_packet_us == T0_US
    frames = list(reader.frames())
    assert [f.data for f in frames] == [p.to_bytes() for p in stream.packets]
    assert [f.offset for f in frames] == frame_offsets(path)
    expected_ms = [20 * i for i in range(50)] if variant == V2 else [None] * 50
    assert [f.arrival_ms for f in frames] == expected_ms
    assert reader.warnings == []
    analysis = analyze(path)
    assert (analysis.frames, analysis.media_us, analysis.duration_us) == (50, 1_000_000, 1_000_000)
    if variant != LEGACY:
        assert analysis.start_us == T0_US


def test_legacy_video_is_vp8(tmp_path: Path) -> None:
    stream = Stream.vp8(vp8_pictures(15))
    path = stream.write(tmp_path / "v.mjr", variant=LEGACY)
    header = MjrReader(path).header
    assert (header.variant, header.kind, header.codec) == (Variant.LEGACY, "video", "vp8")
    analysis = analyze(path)
    assert analysis.frames == 15
    assert [(w, h) for _, w, h in analysis.resolutions] == [(320, 240)]


def test_every_header_field_exposed(tmp_path: Path) -> None:
    header = make_header(
        "a",
        "opus",
        fmtp="minptime=10;useinbandfec=1",
        description="microphone",
        extensions={1: URI_MID, 2: URI_AUDIO_LEVEL},
        created_us=T0_US - 123_456,
        first_us=T0_US,
        red_pt=63,
        encrypted=False,
    )
    assert list(header) == ["t", "c", "f", "d", "x", "s", "u", "or", "e"]
    frames = [(0, rtp_bytes(111, 1, 0, 7, opus_packets(0.02)[0]))]
    path = write_mjr(tmp_path / "h.mjr", header, frames)
    parsed = MjrReader(path).header
    assert parsed.variant is Variant.V2
    assert parsed.kind == "audio"
    assert parsed.codec == "opus"
    assert parsed.fmtp == "minptime=10;useinbandfec=1"
    assert parsed.description == "microphone"
    assert parsed.extensions == {1: URI_MID, 2: URI_AUDIO_LEVEL}
    assert parsed.extension_id("ssrc-audio-level") == 2
    assert parsed.extension_id("video-orientation") is None
    assert parsed.created_us == T0_US - 123_456
    assert parsed.first_packet_us == T0_US
    assert parsed.red_pt == 63
    assert parsed.encrypted is False
    assert parsed.raw == header
    assert parsed.frames_offset == 10 + len(json.dumps(header, separators=(",", ":")))
    assert parsed.to_json()["extensions"] == {"1": URI_MID, "2": URI_AUDIO_LEVEL}
    # the video letter, and a codec in capitals
    path = write_mjr(tmp_path / "v.mjr", make_header("v", "VP8", fmtp="x"), [])
    assert (MjrReader(path).header.kind, MjrReader(path).header.codec) == ("video", "vp8")


def test_arrival_times_are_exposed(tmp_path: Path) -> None:
    stream = Stream.opus(1.0).jitter(random.Random(5), 15)
    path = stream.write(tmp_path / "j.mjr")
    u = stream.packets[0].arrival_us
    assert MjrReader(path).header.first_packet_us == u
    written = [ms for ms, _ in stream.frames(u)]
    assert written[0] == 0 and written != [20 * i for i in range(50)]
    assert [f.arrival_ms for f in MjrReader(path).frames()] == written
    arrivals = [item.arrival_us for item in ordered_packets(MjrReader(path), OrderStats())]
    assert arrivals == [u + ms * MS for ms in written]


def test_arrival_counter_wrap(tmp_path: Path) -> None:
    """The u32 millisecond counter wraps after 49.7 days; times keep rising."""
    packets = Stream.opus(0.08).packets
    ms = [0xFFFF_FF00, 0xFFFF_FFF0, 0x10, 0x20]
    path = write_mjr(
        tmp_path / "w.mjr",
        make_header(),
        [(m, p.to_bytes()) for m, p in zip(ms, packets, strict=True)],
    )
    got = [f.arrival_ms for f in MjrReader(path).frames()]
    assert got == [0xFFFF_FF00, 0xFFFF_FFF0, (1 << 32) + 0x10, (1 << 32) + 0x20]


# -- damaged files: the library ----------------------------------------------------------------
def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mjr"
    path.write_bytes(b"")
    with pytest.raises(EmptyRecordingError) as caught:
        analyze(path)
    assert (caught.value.path, caught.value.offset) == (str(path), 0)


@pytest.mark.parametrize("magic", [b"MJR00002", b"MJR00001", b"MEETECHO"])
def test_magic_only(tmp_path: Path, magic: bytes) -> None:
    path = tmp_path / "magic.mjr"
    path.write_bytes(magic)
    with pytest.raises(EmptyRecordingError) as caught:
        MjrReader(path)
    assert (caught.value.path, caught.value.offset) == (str(path), 8)


@pytest.mark.parametrize(
    ("content", "offset", "words"),
    [
        (b"MJR0", 0, "not an MJR"),
        (bytes(range(256)) * 8, 0, "not an MJR"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", 0, "not an MJR"),
        (b"MJR00002\x00", 8, "header length"),
        (b"MJR00002\xff\xff{}", 10, "65535-byte header"),
        (header_bytes(b'{"t":"a","c":"opus"')[:-3], 10, "header"),
        (header_bytes(b'{"t":"a","c":"opus"') + b"MEET", 10, "not valid"),
        (header_bytes(b"[1,2,3]"), 10, "not an object"),
        (header_bytes(make_header("x", "opus")), 10, "t='x'"),
        (header_bytes(make_header("a", "mp3")), 10, "c='mp3'"),
        (header_bytes(make_header("a", "vp8")), 10, "c='vp8'"),
        (header_bytes("audix", LEGACY), 10, "audix"),
    ],
    ids=[
        "short-magic",
        "garbage",
        "wav",
        "cut-length",
        "absurd-header-length",
        "cut-json",
        "broken-json",
        "json-list",
        "bad-kind",
        "unknown-codec",
        "video-codec-as-audio",
        "bad-legacy-kind",
    ],
)
def test_bad_header_names_file_and_offset(
    tmp_path: Path, content: bytes, offset: int, words: str
) -> None:
    path = tmp_path / "bad.mjr"
    path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        analyze(path)
    assert (caught.value.path, caught.value.offset) == (str(path), offset)
    assert words in str(caught.value)
    assert str(caught.value).startswith(f"{path} at byte {offset}: ")


def test_bit_flip_in_json_header(opus2: Path, tmp_path: Path) -> None:
    data = bytearray(opus2.read_bytes())
    data[10] ^= 0x40  # '{' -> ';'
    path = tmp_path / "flip.mjr"
    path.write_bytes(bytes(data))
    with pytest.raises(InputError) as caught:
        analyze(path)
    assert caught.value.offset == 10


@pytest.mark.parametrize("cut_inside", [3, 9, 10, 50])
def test_truncated_mid_frame_keeps_prefix(opus2: Path, tmp_path: Path, cut_inside: int) -> None:
    offsets = frame_offsets(opus2)
    cut_at = offsets[40]
    path = tmp_path / "cut.mjr"
    path.write_bytes(opus2.read_bytes()[: cut_at + cut_inside])
    reader = MjrReader(path)
    assert len(list(reader.frames())) == 40
    assert reader.truncated_at == cut_at
    assert len(reader.warnings) == 1
    assert f"at byte {cut_at}" in reader.warnings[0]
    assert str(path) in reader.warnings[0]
    analysis = analyze(path)
    assert (analysis.frames, analysis.duration_us) == (40, 800_000)
    assert any(f"at byte {cut_at}" in w for w in analysis.warnings)
    report = convert([path], tmp_path / "cut.opus")
    assert report.frames_written == {"audio": 40}
    assert any(f"at byte {cut_at}" in w for w in report.warnings)
    assert abs(decode_audio(tmp_path / "cut.opus").duration - 0.8) < 0.04


def _damage_frame(src: Path, dst: Path, index: int, pos: int, value: bytes) -> int:
    data = bytearray(src.read_bytes())
    offset = frame_offsets(src)[index]
    data[offset + pos : offset + pos + len(value)] = value
    dst.write_bytes(bytes(data))
    return offset


@pytest.mark.parametrize(
    ("pos", "value", "words"),
    [
        (0, b"MEEX", "bad frame prefix"),
        (1, b"\x00", "bad frame prefix"),
        (8, b"\xff\xff", "frame length 65535"),
        (8, b"\x05\xdd", "frame length 1501"),
        (8, b"\x00\x00", "frame length 0"),
    ],
    ids=["magic-bitflip", "magic-zero", "length-65535", "length-1501", "length-0"],
)
def test_damaged_frame_prefix_is_skipped(
    opus2: Path, tmp_path: Path, pos: int, value: bytes, words: str
) -> None:
    path = tmp_path / "dmg.mjr"
    offset = _damage_frame(opus2, path, 20, pos, value)
    next_offset = frame_offsets(opus2)[21]
    reader = MjrReader(path)
    frames = list(reader.frames())
    assert len(frames) == 99
    assert frame_offsets(opus2)[20] not in [f.offset for f in frames]
    assert reader.skipped_bytes == next_offset - offset
    assert len(reader.warnings) == 1
    assert f"{words} at byte {offset}" in reader.warnings[0]
    assert f"next frame at {next_offset}" in reader.warnings[0]
    analysis = analyze(path)
    assert (analysis.frames, analysis.stats.lost, analysis.duration_us) == (99, 1, 2_000_000)
    assert gaps_rel(analysis) == [(400_000, 20_000, "loss", 1)]


def test_short_length_field_makes_one_invalid_rtp_frame(opus2: Path, tmp_path: Path) -> None:
    """Length 5 reads 5 bytes of RTP (invalid), then resyncs at the next frame."""
    path = tmp_path / "short.mjr"
    offset = _damage_frame(opus2, path, 20, 8, b"\x00\x05")
    analysis = analyze(path)
    assert analysis.stats.invalid == 1
    assert analysis.stats.invalid_offsets == [offset]
    assert (analysis.frames, analysis.stats.lost) == (99, 1)
    assert any(f"at byte {offset + 15}" in w for w in analysis.warnings)


def test_absurd_length_of_last_frame_is_a_truncation(opus2: Path, tmp_path: Path) -> None:
    path = tmp_path / "last.mjr"
    offset = _damage_frame(opus2, path, 99, 8, b"\x05\xdc")  # 1500: beyond the end of file
    reader = MjrReader(path)
    assert len(list(reader.frames())) == 99
    assert reader.truncated_at == offset


def test_rtp_version_bitflip_counts_invalid(opus2: Path, tmp_path: Path) -> None:
    path = tmp_path / "ver.mjr"
    offset = _damage_frame(opus2, path, 20, 10, b"\x40")
    analysis = analyze(path)
    assert (analysis.stats.invalid, analysis.stats.invalid_offsets) == (1, [offset])
    assert analysis.stats.first_invalid_reason == f"byte {offset}: RTP version is 1, not 2"
    assert (analysis.frames, analysis.stats.lost) == (99, 1)


def test_random_bit_flips_in_frames_never_crash(opus2: Path, tmp_path: Path) -> None:
    rng = random.Random(7)
    original = opus2.read_bytes()
    start = frame_offsets(opus2)[0]
    for case in range(12):
        data = bytearray(original)
        for _ in range(8):
            bit = rng.randrange(start * 8, len(data) * 8)
            data[bit // 8] ^= 1 << (bit % 8)
        path = tmp_path / f"flip{case}.mjr"
        path.write_bytes(bytes(data))
        analysis = analyze(path)  # the header is intact: something always survives
        stats = analysis.stats
        assert 0 < analysis.frames == stats.packets - len(analysis.outliers)
        assert stats.packets + stats.late + stats.duplicates + stats.invalid <= 100
        report = convert([path], tmp_path / f"flip{case}.opus")
        assert report.frames_written["audio"] <= 100


def test_ssrc_switch_back_kept(tmp_path: Path) -> None:
    stream = Stream.opus(3.0).ssrc_change(50, SSRC_B, seq=20_000)
    stream.ssrc_change(100, 0x11223344, seq=51)
    analysis = analyze(stream.write(tmp_path / "aba.mjr"))
    assert (analysis.frames, analysis.stats.late) == (150, 0)
    assert abs(analysis.duration_us - 3_000_000) <= TOL_US


def test_single_stray_ssrc_packet(tmp_path: Path) -> None:
    stream = Stream.opus(2.0)
    stream.by_index(30).ssrc ^= 0x0100  # one flipped bit
    analysis = analyze(stream.write(tmp_path / "stray.mjr"))
    assert analysis.frames >= 99
    assert abs(analysis.duration_us - 2_000_000) <= TOL_US


def _no_packet_files(tmp_path: Path) -> dict[str, tuple[Path, int]]:
    header = header_bytes(make_header())
    packet = Stream.opus(0.02).packets[0].to_bytes()
    files = {
        "header-only": (header, len(header)),
        "only-frame-absurd-length": (header + b"MEET\0\0\0\0\xff\xff" + packet, len(header)),
        "only-frame-not-rtp": (header + frame_bytes(b"\x00" * 40), len(header)),
    }
    out = {}
    for name, (content, offset) in files.items():
        path = tmp_path / f"{name}.mjr"
        path.write_bytes(content)
        out[name] = (path, offset)
    return out




@pytest.mark.parametrize(
    "name",
    [
        "header-only",
        "only-frame-absurd-length",
        "only-frame-not-rtp",
    ],
)
def test_no_usable_packet_error_names_offset(tmp_path: Path, name: str) -> None:
    path, offset = _no_packet_files(tmp_path)[name]
    with pytest.raises(InputError) as caught:
        analyze(path)
    assert caught.value.offset == offset


# -- damaged files: the command line -----------------------------------------------------------
CLI_CASES = {
    "empty": (b"", 0),
    "magic-only": (b"MJR00002", 8),
    "garbage": (bytes(range(256)) * 4, 0),
    "absurd-header-length": (b"MJR00002\xff\xff{}", 10),
    "broken-json": (header_bytes(b'{"t":"a",,}'), 10),
}


@pytest.mark.parametrize(
    ("case", "command"),
    [(case, "convert") for case in CLI_CASES] + [("empty", "inspect"), ("garbage", "inspect")],
)
def test_cli_bad_input_one_line(tmp_path: Path, case: str, command: str) -> None:
    content, offset = CLI_CASES[case]
    path = tmp_path / f"{case}.mjr"
    path.write_bytes(content)
    output = tmp_path / "out.webm"
    args = [command, path] if command == "inspect" else [command, path, "-o", output]
    result = run_cli(*args)
    assert_one_error_line(result, path, offset)
    assert not output.exists()
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind


def test_cli_truncated_file_salvaged(opus2: Path, tmp_path: Path) -> None:
    cut_at = frame_offsets(opus2)[40]
    path = tmp_path / "cut.mjr"
    path.write_bytes(opus2.read_bytes()[: cut_at + 20])
    output = tmp_path / "cut.opus"
    result = run_cli("convert", path, "-o", output)
    assert "Traceback" not in result.stderr
    assert result.returncode == 0, result.stderr
    assert output.exists()
    assert f"at byte {cut_at}" in " ".join(result.stderr.split())
    inspected = run_cli("inspect", "--json", path)
    assert inspected.returncode == 0
    report = json.loads(inspected.stdout)
    assert (report["packets"], report["duration_s"]) == (40, 0.8)
    assert any(f"at byte {cut_at}" in w for w in report["warnings"])


def test_cli_warning_is_one_line(opus2: Path, tmp_path: Path) -> None:
    cut_at = frame_offsets(opus2)[40]
    path = tmp_path / "a-fairly-long-recording-name-as-janus-writes-them-audio-0.mjr"
    path.write_bytes(opus2.read_bytes()[: cut_at + 20])
    result = run_cli("convert", path, "-o", tmp_path / "cut.opus")
    assert result.returncode == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1
    assert str(path) in warnings[0] and f"at byte {cut_at}" in warnings[0]


def test_cli_damaged_frames_exit_zero(opus2: Path, tmp_path: Path) -> None:
    path = tmp_path / "dmg.mjr"
    _damage_frame(opus2, path, 20, 8, b"\xff\xff")
    result = run_cli("convert", path, "-o", tmp_path / "dmg.webm")
    assert "Traceback" not in result.stderr
    assert result.returncode == 0
    assert (tmp_path / "dmg.webm").exists()


# -- end-to-end encryption ---------------------------------------------------------------------
def test_encrypted_recording_refused(tmp_path: Path) -> None:
    path = Stream.opus(0.5).write(tmp_path / "e2ee.mjr", encrypted=True)
    assert MjrReader(path).header.encrypted is True
    for call in (lambda: analyze(path), lambda: convert([path], tmp_path / "o.opus")):
        with pytest.raises(InputError) as caught:
            call()
        assert caught.value.path == str(path)
        assert "encrypted" in str(caught.value)
    result = run_cli("convert", path, "-o", tmp_path / "o.opus")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"melter: error: {path}") and "encrypted" in lines[0]
    assert not (tmp_path / "o.opus").exists()


# -- RTP header details ------------------------------------------------------------------------
def test_csrcs_extensions_and_padding_parse(tmp_path: Path) -> None:
    """L16 counts samples from the payload size, so unstripped padding would show."""
    payloads = l16_payloads(1.0, 1000.0)
    stream = Stream.audio(payloads, 320, codec="l16", pt=100)
    stream.set_csrcs([0x01020304, 0xA0B0C0D0, 7]).set_padding(4)
    stream.extension(1, b"0", uri=URI_MID).extension(5, b"\x01\x02\x03")
    path = stream.write(tmp_path / "l16.mjr")
    packets = [RtpPacket.parse(f.data) for f in MjrReader(path).frames()]
    assert len(packets) == 50
    first = packets[0]
    assert first.csrcs == [0x01020304, 0xA0B0C0D0, 7]
    assert first.extension_profile == 0xBEDE
    assert first.extensions == {1: b"0", 5: b"\x01\x02\x03"}
    assert first.padding == 4
    assert [p.payload for p in packets] == list(payloads)
    assert [p.payload_type for p in packets] == [100] * 50
    analysis = analyze(path)
    assert analysis.media_us == 1_000_000
    assert analysis.duration_us == 1_000_000
    report = convert([path], tmp_path / "l16.wav")
    assert report.frames_written == {"audio": 50}
    assert len(decode_audio(tmp_path / "l16.wav", rate=16000).samples) == 16000


def test_two_byte_extensions_parse(tmp_path: Path) -> None:
    stream = Stream.opus(0.2)
    stream.extension(200, bytes(range(20)), two_byte=True)
    stream.extension(3, b"", two_byte=True)  # two-byte elements may be empty
    path = stream.write(tmp_path / "two.mjr")
    packets = [RtpPacket.parse(f.data) for f in MjrReader(path).frames()]
    assert packets[0].extension_profile == 0x1000
    assert packets[0].extensions == {200: bytes(range(20)), 3: b""}
    assert [p.payload for p in packets] == [p.payload for p in stream.packets]
    assert analyze(path).media_us == 200_000


def test_one_byte_extension_padding_between_elements() -> None:
    block = bytes((0x10, 0x41, 0x00, 0x00, 0x21, 0x01, 0x02, 0x00))  # id1 'A', pad, id2 2 bytes
    data = rtp_bytes(111, 9, 960, 5, b"\xf8\xff\xfe")
    data = bytes((data[0] | 0x10,)) + data[1:12] + b"\xbe\xde\x00\x02" + block + data[12:]
    packet = RtpPacket.parse(data)
    assert packet.extensions == {1: b"A", 2: b"\x01\x02"}
    assert packet.payload == b"\xf8\xff\xfe"
    assert extension_block({1: b"A"})[:4] == b"\xbe\xde\x00\x01"


# -- audio level and video orientation ---------------------------------------------------------
@pytest.mark.parametrize("style", ["mapped", "unmapped-with-mid", "two-byte"])
def test_audio_levels_exposed(tmp_path: Path, style: str) -> None:
    stream = Stream.opus(2.0)
    levels = [13, 53, 127]
    if style == "mapped":
        stream.audio_levels(1, levels)
        level_id = 1
    elif style == "unmapped-with-mid":  # VideoRoom 1.1.2: no x map, mid on id 1, level on 2
        stream.extension(1, b"0").audio_levels(2, levels, mapped=False)
        level_id = 2
    else:
        stream.audio_levels(20, levels, two_byte=True)
        level_id = 20
    path = stream.write(tmp_path / "lvl.mjr")
    analysis = analyze(path)
    assert analysis.audio_level_id == level_id
    assert analysis.levels == {13: 34, 53: 33, 127: 33}
    frame_levels = [f.level for f in timed_frames(analysis)]
    assert frame_levels == [levels[i % 3] for i in range(100)]


@pytest.mark.parametrize(("degrees", "probe_rotation"), [(90, -90), (270, 90), (180, 180)])
def test_video_rotation_written_as_display_matrix(
    tmp_path: Path, degrees: int, probe_rotation: int
) -> None:
    pictures = vp8_pictures(15, split=True)  # left half red, right half blue
    path = Stream.vp8(pictures).orientation(3, degrees).write(tmp_path / "rot.mjr")
    analysis = analyze(path)
    assert analysis.orientation_id == 3
    assert analysis.rotations == [(analysis.start_us, degrees, False)]
    output = tmp_path / "rot.webm"
    convert([path], output)
    side = ffprobe_streams(output)[0].get("side_data_list", [])
    assert [abs(s["rotation"]) for s in side if "rotation" in s] == [abs(probe_rotation)]
    assert next(s["rotation"] for s in side if "rotation" in s) in (probe_rotation, -180, 180)
    # ffmpeg turns the picture upright: clockwise by ``degrees`` moves the red half to the top
    # (90), to the right (180) or to the bottom (270).
    first_frame = ["-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(output), *first_frame],
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout
    width, height = (320, 240) if degrees == 180 else (240, 320)
    image = np.frombuffer(raw, np.uint8).reshape(height, width, 3).astype(int)
    red = {
        90: image[height // 4, width // 2],
        180: image[height // 2, 4 * width // 5],
        270: image[3 * height // 4, width // 2],
    }[degrees]
    assert red[0] > 150 and red[2] < 100, red


def test_rotation_change_and_flip_listed(tmp_path: Path) -> None:
    stream = Stream.vp8(vp8_pictures(30))
    first_late = _picture_indices(stream, 15)[0]
    stream.orientation(3, 90).orientation(3, 0, flip=True, since=first_late)
    analysis = analyze(stream.write(tmp_path / "rot2.mjr"))
    assert [(d, f) for _, d, f in analysis.rotations] == [(90, False), (0, True)]
    assert abs(analysis.rotations[1][0] - analysis.rotations[0][0] - 1_000_000) <= 2 * MS


# -- RED ---------------------------------------------------------------------------------------
def _red_stream(blocks: int = 1) -> tuple[Stream, tuple[bytes, ...]]:
    opus = opus_packets(2.0)
    payloads = []
    for i, primary in enumerate(opus):
        redundant = [(960 * k, opus[i - k]) for k in range(blocks, 0, -1) if i - k >= 0]
        payloads.append(red_payload(111, primary, redundant))
    return Stream.audio(payloads, 960, pt=63), opus


@pytest.mark.parametrize(
    ("drops", "blocks", "written", "silence_ms"),
    [((), 1, 100, 0), ((30,), 1, 100, 0), ((30, 31), 1, 99, 20), ((30, 31), 2, 100, 0)],
)
def test_red_deencapsulated_and_recovers_loss(
    tmp_path: Path, drops: tuple[int, ...], blocks: int, written: int, silence_ms: int
) -> None:
    stream, opus = _red_stream(blocks)
    path = stream.drop(*drops).write(tmp_path / "red.mjr", red_pt=63)
    analysis = analyze(path)
    assert analysis.codec == "opus"
    assert analysis.frames == 100 - len(drops)
    assert analysis.stats.lost == len(drops)
    assert analysis.duration_us == 2_000_000
    frames = list(timed_frames(analysis))
    assert len(frames) == written
    assert all(f.data in opus for f in frames)  # no RED header left
    assert [f.data for f in frames][:30] == list(opus[:30])
    report = convert([path], tmp_path / "red.opus")
    assert report.frames_written == {"audio": written}
    assert report.silence_ms == pytest.approx(silence_ms)
    assert abs(decode_audio(tmp_path / "red.opus").duration - 2.0) < 0.04


# -- ordering ----------------------------------------------------------------------------------
def test_duplicates_dropped(tmp_path: Path) -> None:
    stream = Stream.opus(2.0)
    for index, later in [(3, 0), (10, 2), (50, 5), (51, 30), (99, 0)]:
        stream.duplicate(index, later)
    path = stream.write(tmp_path / "dup.mjr")
    seqs, stats = ordered_seqs(path)
    assert seqs == list(range(1, 101))
    assert (stats.packets, stats.duplicates, stats.lost, stats.late) == (100, 5, 0, 0)
    analysis = analyze(path)
    assert (analysis.frames, analysis.duration_us, analysis.gaps) == (100, 2_000_000, [])
    assert convert([path], tmp_path / "dup.opus").frames_written == {"audio": 100}


def test_reordering_restored(tmp_path: Path) -> None:
    stream = Stream.opus(2.0).swap(10, 11).delay(20, 3).delay(40, 10).swap(70, 72)
    path = stream.write(tmp_path / "reo.mjr")
    seqs, stats = ordered_seqs(path)
    assert seqs == list(range(1, 101))
    # late arrivals: 10 (after 11), 20 (after 21..23), 40 (after 41..50), 71 and 70 (after 72)
    assert (stats.packets, stats.reordered, stats.lost, stats.late) == (100, 5, 0, 0)
    analysis = analyze(path)
    assert (analysis.duration_us, analysis.gaps) == (2_000_000, [])
    frames = list(timed_frames(analysis))
    assert [f.data for f in frames] == list(opus_packets(2.0))
    assert [f.wall_us - T0_US for f in frames] == [20_000 * i for i in range(100)]


@pytest.mark.parametrize("where", ["track-start", "after-ssrc-change"])
def test_first_packet_of_segment_reordered(tmp_path: Path, where: str) -> None:
    stream = Stream.opus(2.0)
    if where == "track-start":
        stream.swap(0, 1)
    else:
        stream.ssrc_change(50, SSRC_B, seq=9000).swap(50, 51)
    seqs, stats = ordered_seqs(stream.write(tmp_path / "first.mjr"))
    assert (stats.packets, stats.late) == (100, 0)
    assert len(seqs) == 100


@pytest.mark.parametrize(
    ("seq", "ts"),
    [(65500, 0), (1, 2**32 - 24_000), (65530, 2**32 - 960 * 3)],
    ids=["seq-wrap", "ts-wrap", "both"],
)
def test_wraps(tmp_path: Path, seq: int, ts: int) -> None:
    stream = Stream.opus(2.0, seq=seq, ts=ts).swap(40, 41).drop(60)
    path = stream.write(tmp_path / "wrap.mjr")
    seqs, stats = ordered_seqs(path)
    assert seqs == [(seq + i) & 0xFFFF for i in range(100) if i != 60]
    assert (stats.lost, stats.reordered, stats.seq_restarts) == (1, 1, 0)
    analysis = analyze(path)
    assert analysis.duration_us == 2_000_000
    assert len(analysis.pieces) == 1
    assert gaps_rel(analysis) == [(1_200_000, 20_000, "loss", 1)]
    report = convert([path], tmp_path / "wrap.opus")
    assert report.frames_written == {"audio": 99}
    assert report.silence_ms == pytest.approx(20)


@pytest.mark.parametrize("new_ts", [None, 123_456_789], ids=["ts-continues", "ts-restarts"])
def test_ssrc_change_kept(tmp_path: Path, new_ts: int | None) -> None:
    stream = Stream.opus(4.0).ssrc_change(100, SSRC_B, seq=40_000, ts=new_ts)
    path = stream.write(tmp_path / "ssrc.mjr")
    seqs, stats = ordered_seqs(path)
    assert seqs == list(range(1, 101)) + list(range(40_000, 40_100))
    assert (stats.ssrcs, stats.ssrc_changes, stats.lost) == ([0x11223344, SSRC_B], 1, 0)
    analysis = analyze(path)
    assert abs(analysis.duration_us - 4_000_000) <= TOL_US
    output = tmp_path / "ssrc.opus"
    assert convert([path], output).frames_written == {"audio": 200}
    audio = decode_audio(output)
    assert abs(audio.duration - 4.0) < 0.04
    second = audio.samples[int(2.2 * audio.rate) : int(3.8 * audio.rate)]
    assert rms(second) > 0.1  # the second sender's packets are in the output


def test_ssrc_change_piece_reason(tmp_path: Path) -> None:
    stream = Stream.opus(4.0).ssrc_change(100, SSRC_B, seq=40_000, ts=123_456_789)
    analysis = analyze(stream.write(tmp_path / "ssrc.mjr"))
    assert [p.reason for p in analysis.pieces] == ["start", "ssrc-change"]


@pytest.mark.parametrize("offset_ms", [-400, 400])
def test_ssrc_change_small_ts_offset_repaired(tmp_path: Path, offset_ms: int) -> None:
    """The new sender's timestamps start 400 ms behind/ahead; arrivals are continuous."""
    continuous = 100 * 960
    stream = Stream.opus(4.0).ssrc_change(100, SSRC_B, seq=40_000, ts=continuous + offset_ms * 48)
    path = stream.write(tmp_path / "near.mjr")
    analysis = analyze(path)
    assert abs(analysis.duration_us - 4_000_000) <= TOL_US
    report = convert([path], tmp_path / "near.opus")
    assert (report.frames_written, report.dropped_audio) == ({"audio": 200}, 0)
    assert abs(decode_audio(tmp_path / "near.opus").duration - 4.0) < 0.04


# -- timing repair -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "edit",
    ["jump+10min", "jump-30s", "jump+1day", "reset0", "reset-random", "jump-then-reset"],
)
def test_timestamp_jump_repaired_from_arrivals(tmp_path: Path, edit: str) -> None:
    stream = Stream.opus(4.0, ts=5_000_000).jitter(random.Random(3), 6)
    if edit == "jump+10min":
        stream.ts_jump(100, 48000 * 600)
    elif edit == "jump-30s":
        stream.ts_jump(100, -48000 * 30)
    elif edit == "jump+1day":
        stream.ts_jump(100, 48000 * 86400)
    elif edit == "reset0":
        stream.ts_reset(100, 0)
    elif edit == "reset-random":
        stream.ts_reset(100, 3_141_592_653)
    else:
        stream.ts_jump(60, 48000 * 77).ts_reset(140, 17)
    path = stream.write(tmp_path / "jump.mjr")
    analysis = analyze(path)
    assert analysis.stats.lost == 0
    assert abs(analysis.duration_us - stream.wall_span_us) <= TOL_US
    output = tmp_path / "jump.opus"
    report = convert([path], output)
    assert report.frames_written == {"audio": 200}
    assert report.silence_ms < 40
    assert abs(decode_audio(output).duration - stream.wall_span_us / 1e6) < 0.04


@pytest.mark.parametrize("ts_runs", [True, False], ids=["ts-runs", "ts-frozen"])
def test_pause_keeps_wall_clock_length(tmp_path: Path, ts_runs: bool) -> None:
    stream = Stream.opus(4.0).pause(100, 2.0, ts_runs=ts_runs)
    path = stream.write(tmp_path / "pause.mjr")
    assert stream.wall_span_us == 6_000_000
    analysis = analyze(path)
    assert abs(analysis.duration_us - 6_000_000) <= TOL_US
    assert analysis.stats.lost == 0
    if ts_runs:
        assert len(analysis.pieces) == 1
        assert gaps_rel(analysis) == [(2_000_000, 2_000_000, "pause", 0)]
    output = tmp_path / "pause.opus"
    convert([path], output)
    audio = decode_audio(output)
    assert abs(audio.duration - 6.0) < 0.04
    rate = audio.rate

    def part(a: float, b: float) -> np.ndarray:
        return audio.samples[int(a * rate) : int(b * rate)]

    assert rms(part(2.1, 3.9)) < 1e-3  # silence in the pause
    assert rms(part(0.2, 1.8)) > 0.1 and rms(part(4.2, 5.8)) > 0.1
    assert abs(tone_hz(part(4.2, 5.8), rate) - 440) < 3


def test_stop_resume_gap_listed(tmp_path: Path) -> None:
    stream = Stream.opus(4.0).pause(100, 2.0, ts_runs=False)
    analysis = analyze(stream.write(tmp_path / "stop.mjr"))
    assert len(analysis.gaps) == 1
    gap = analysis.gaps[0]
    assert abs(gap.start_us - (T0_US + 2_000_000)) <= TOL_US
    assert abs(gap.length_us - 2_000_000) <= TOL_US


def test_dtx_gaps_filled(tmp_path: Path) -> None:
    """1 s of speech, 2 s of DTX (one silence packet every 400 ms), 1 s of speech."""
    tone = opus_packets(2.0)
    payloads = [*tone[:50], *[opus_silence_packet()] * 5, *tone[50:]]
    ticks = [960] * 50 + [19_200] * 5 + [960] * 50
    stream = Stream.audio(payloads, ticks)
    path = stream.write(tmp_path / "dtx.mjr")
    assert stream.wall_span_us == 4_000_000
    analysis = analyze(path)
    assert analysis.duration_us == 4_000_000
    assert analysis.stats.lost == 0
    assert gaps_rel(analysis) == [(1_020_000 + 400_000 * k, 380_000, "pause", 0) for k in range(5)]
    output = tmp_path / "dtx.opus"
    report = convert([path], output)
    assert report.frames_written == {"audio": 105}
    assert report.silence_ms == pytest.approx(1900)
    audio = decode_audio(output)
    assert abs(audio.duration - 4.0) < 0.04
    assert rms(audio.samples[int(1.1 * audio.rate) : int(2.9 * audio.rate)]) < 1e-3


@pytest.mark.parametrize(("frame_ms", "toc_code"), [(10, 0), (20, 0), (40, 1), (60, 3)])
def test_opus_packet_durations_from_toc(tmp_path: Path, frame_ms: int, toc_code: int) -> None:
    stream = Stream.opus(2.4, frame_ms=frame_ms)
    count = 2400 // frame_ms
    assert len(stream) == count
    assert {p.payload[0] & 0x03 for p in stream.packets} == {toc_code}
    path = stream.write(tmp_path / f"p{frame_ms}.mjr")
    analysis = analyze(path)
    assert (analysis.frames, analysis.media_us, analysis.duration_us) == (
        count,
        2_400_000,
        2_400_000,
    )
    assert analysis.gaps == []
    output = tmp_path / f"p{frame_ms}.opus"
    report = convert([path], output)
    assert (report.frames_written, report.silence_ms) == ({"audio": count}, 0)
    audio = decode_audio(output)
    assert abs(audio.duration - 2.4) < 0.04
    assert abs(tone_hz(audio.samples[4800:-4800], audio.rate) - 440) < 3


@pytest.mark.parametrize("ppm", [200, -150])
def test_clock_skew_estimated(tmp_path: Path, ppm: int) -> None:
    second = opus_packets(1.0)
    payloads = [second[i % 50] for i in range(3000)]  # 60 s
    stream = Stream.audio(payloads, 960).skew(ppm).jitter(random.Random(11), 10)
    path = stream.write(tmp_path / "skew.mjr")
    analysis = analyze(path)
    assert abs(analysis.skew_ppm - ppm) <= 30
    assert abs(analysis.duration_us - stream.wall_span_us) <= TOL_US
    assert analysis.gaps == []
    assert len(analysis.pieces) == 1


def test_single_corrupt_timestamp_does_not_stretch_output(tmp_path: Path) -> None:
    stream = Stream.opus(4.0)
    stream.by_index(100).ts = (stream.by_index(100).ts + 48000 * 3600) & 0xFFFFFFFF
    path = stream.write(tmp_path / "wild.mjr")
    analysis = analyze(path)
    assert abs(analysis.start_us - T0_US) <= TOL_US
    report = convert([path], tmp_path / "wild.opus")
    assert report.silence_ms < 100
    assert abs(decode_audio(tmp_path / "wild.opus").duration - 4.0) < 0.1


# -- video -------------------------------------------------------------------------------------
def _picture_indices(stream: Stream, picture: int) -> list[int]:
    return [p.index for p in stream.packets if p.ts == picture * 6000]


def test_vp8_starting_without_keyframe(tmp_path: Path) -> None:
    stream = Stream.vp8(vp8_pictures(30), mtu=60)  # key frames at pictures 0 and 15
    for picture in range(5):
        stream.drop(*_picture_indices(stream, picture))
    path = stream.write(tmp_path / "nokey.mjr")
    analysis = analyze(path)
    assert analysis.frames == 25
    assert [k - analysis.start_us for k in analysis.keyframes_us] == [
        pytest.approx(666_667, abs=2 * MS)
    ]
    output = tmp_path / "nokey.webm"
    report = convert([path], output)
    assert report.frames_written == {"video": 15}
    assert any("10 before the first key frame" in w for w in report.warnings)
    assert ffmpeg_errors(output) == ""
    assert len(decoded_video_frames(output)) == 15


def test_vp8_loss_drops_until_next_keyframe(tmp_path: Path) -> None:
    stream = Stream.vp8(vp8_pictures(30), mtu=60)
    victim = _picture_indices(stream, 8)
    assert len(victim) >= 2
    path = stream.drop(victim[1]).write(tmp_path / "loss.mjr")
    analysis = analyze(path)
    assert analysis.stats.lost == 1
    assert len(analysis.keyframes_us) == 2
    output = tmp_path / "loss.webm"
    report = convert([path], output)
    assert report.frames_written == {"video": 23}  # pictures 8..14 left out
    assert ffmpeg_errors(output) == ""
    assert len(decoded_video_frames(output)) == 23


def test_vp8_resolution_change(tmp_path: Path) -> None:
    pictures = vp8_pictures(15) + vp8_pictures(15, size=(640, 360), color=(200, 50, 50))
    path = Stream.vp8(pictures).write(tmp_path / "res.mjr")
    analysis = analyze(path)
    sizes = [(w, h) for _, w, h in analysis.resolutions]
    assert sizes == [(320, 240), (640, 360)]
    change = analysis.resolutions[1][0] - analysis.resolutions[0][0]
    assert abs(change - 1_000_000) <= 2 * MS
    assert (analysis.max_width, analysis.max_height) == (640, 360)
    output = tmp_path / "res.webm"
    assert convert([path], output).frames_written == {"video": 30}
    assert ffmpeg_errors(output) == ""
    assert decoded_video_frames(output) == [(320, 240)] * 15 + [(640, 360)] * 15


@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_h264_single_stap_fu(tmp_path: Path, suffix: str) -> None:
    stream = Stream.h264(h264_pictures(30), mtu=300)
    kinds = {p.payload[0] & 0x1F for p in stream.packets}
    assert {24, 28} <= kinds and kinds & {1, 5}
    path = stream.write(tmp_path / "h264.mjr")
    analysis = analyze(path)
    assert analysis.codec == "h264"
    assert (analysis.frames, len(analysis.keyframes_us)) == (30, 2)
    assert [(w, h) for _, w, h in analysis.resolutions] == [(320, 240)]
    assert analysis.extradata is not None and analysis.extradata[4] & 0x1F == 7
    output = tmp_path / f"h264{suffix}"
    assert convert([path], output).frames_written == {"video": 30}
    assert ffmpeg_errors(output) == ""
    assert decoded_video_frames(output) == [(320, 240)] * 30


# -- fixed-rate audio to WAV and data to SRT ---------------------------------------------------
@pytest.mark.parametrize(
    ("codec", "pt", "kind", "rate"),
    [
        ("g711", 0, "pcmu", 8000),
        ("g711", 8, "pcma", 8000),
        ("pcmu", 0, "pcmu", 8000),
        ("pcma", 8, "pcma", 8000),
        ("g722", 9, "g722", 16000),
        ("l16", 100, "l16", 16000),
        ("l16-48", 100, "l16-48", 48000),
    ],
)
def test_fixed_rate_audio_to_wav(tmp_path: Path, codec: str, pt: int, kind: str, rate: int) -> None:
    if kind in ("pcmu", "pcma"):
        payloads = g711_payloads(2.0, 1000.0, "mulaw" if kind == "pcmu" else "alaw")
        ticks = 160
    elif kind == "g722":
        payloads, ticks = g722_payloads(2.0, 1000.0), 160  # 320 samples on an 8 kHz clock
    else:
        ptime = 10 if rate == 48000 else 20  # 20 ms of 48 kHz L16 exceeds the MTU
        payloads, ticks = l16_payloads(2.0, 1000.0, rate, ptime), rate * ptime // 1000
    stream = Stream.audio(payloads, ticks, codec=codec, pt=pt).drop(40, 41)
    path = stream.write(tmp_path / "pcm.mjr")
    analysis = analyze(path)
    assert analysis.codec == kind
    assert analysis.duration_us == 2_000_000
    assert analysis.stats.lost == 2
    output = tmp_path / "pcm.wav"
    convert([path], output)
    with av.open(str(output)) as container:
        stream_info = container.streams.audio[0]
        assert (stream_info.codec_context.name, stream_info.rate) == ("pcm_s16le", rate)
    audio = decode_audio(output, rate=rate)
    assert abs(len(audio.samples) - 2 * rate) <= rate // 1000
    assert abs(tone_hz(audio.samples[: rate // 2], rate) - 1000) < 5
    assert 0.25 < np.abs(audio.samples).max() < 0.35
    ptime_s = ticks / (8000 if kind in ("pcmu", "pcma", "g722") else rate)
    lost = audio.samples[int(40.5 * ptime_s * rate) : int(41.5 * ptime_s * rate)]
    assert np.abs(lost).max() < 0.02  # the two lost packets are silence


def test_data_to_srt(tmp_path: Path) -> None:
    path = data_recording(
        tmp_path / "chat.mjr",
        [
            (T0_US, b"hello"),
            (T0_US + 1_500_000, b"world"),
            (T0_US + 3_725_250, "\u00fcn\u00efcode\r\nline two".encode()),
        ],
    )
    analysis = analyze(path)
    assert (analysis.kind, analysis.frames, analysis.duration_us) == ("data", 3, 3_725_250)
    output = tmp_path / "chat.srt"
    assert convert([path], output).frames_written == {"data": 3}
    assert output.read_text(encoding="utf-8") == (
        "1\n00:00:00,000 --> 00:00:01,500\nhello\n\n"
        "2\n00:00:01,500 --> 00:00:03,725\nworld\n\n"
        "3\n00:00:03,725 --> 00:00:06,725\n\u00fcn\u00efcode\nline two\n\n"
    )


# -- refused outputs ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_tracks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tracks")
    return {
        "opus": Stream.opus(0.5).write(folder / "opus.mjr"),
        "vp8": Stream.vp8(vp8_pictures(15)).write(folder / "vp8.mjr"),
        "h264": Stream.h264(h264_pictures(30)).write(folder / "h264.mjr"),
        "pcmu": Stream.audio(g711_payloads(0.5), 160, codec="g711", pt=0).write(
            folder / "pcmu.mjr"
        ),
        "data": data_recording(folder / "data.mjr", [(T0_US, b"hi")]),
    }


@pytest.mark.parametrize(
    ("tracks", "suffix", "words"),
    [
        (["vp8"], ".mp4", "use .webm or .mkv"),
        (["h264"], ".webm", "use .mkv or .mp4"),
        (["h264"], ".opus", "h264 cannot go into .opus"),
        (["pcmu"], ".opus", "use .wav (decoded)"),
        (["pcmu"], ".webm", "pcmu cannot go into .webm"),
        (["opus"], ".srt", ".srt output needs a data recording"),
        (["vp8"], ".wav", ".wav output needs one audio recording"),
        (["data"], ".webm", "a data recording converts to .srt"),
        (["opus", "pcmu"], ".webm", "one audio and one video"),
    ],
)
def test_convert_refuses_wrong_container(
    tmp_path: Path, sample_tracks: dict[str, Path], tracks: list[str], suffix: str, words: str
) -> None:
    inputs = [sample_tracks[name] for name in tracks]
    output = tmp_path / f"out{suffix}"
    with pytest.raises(MelterError) as caught:
        convert(inputs, output)
    assert isinstance(caught.value, UnsupportedError)
    assert words in str(caught.value)
    assert not output.exists()
    if suffix != ".webm":
        return  # the command line is checked on a few cases (each run costs a second)
    result = run_cli("convert", *inputs, "-o", output)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("melter: error: ") and words in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_cli_unknown_output_type_is_usage_error(
    tmp_path: Path, sample_tracks: dict[str, Path]
) -> None:
    result = run_cli("convert", sample_tracks["opus"], "-o", tmp_path / "out.xyz")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.xyz").exists()


def test_output_never_overwritten_on_failure(
    tmp_path: Path, sample_tracks: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "keep.webm"
    convert([sample_tracks["opus"]], output)
    good = output.read_bytes()
    assert len(good) > 1000
    empty = tmp_path / "empty.mjr"
    empty.write_bytes(b"MJR00002")
    # 1. bad input
    with pytest.raises(EmptyRecordingError):
        convert([empty], output)
    # 2. refused container
    with pytest.raises(UnsupportedError):
        convert([sample_tracks["h264"]], output)
    # 3. failure in the middle of writing
    real = convert_module.timed_frames

    def breaks_halfway(analysis):
        for number, frame in enumerate(real(analysis)):
            if number == 10:
                raise InputError(analysis.path, "disk on fire", offset=1234)
            yield frame

    monkeypatch.setattr(convert_module, "timed_frames", breaks_halfway)
    with pytest.raises(InputError, match="disk on fire"):
        convert([sample_tracks["opus"]], output)
    monkeypatch.undo()
    assert output.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.mjr", "keep.webm"]
    # 4. through the command line
    result = run_cli("convert", empty, "-o", output)
    assert_one_error_line(result, empty, 8)
    assert output.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.mjr", "keep.webm"]
