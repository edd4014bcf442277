"""A small MJR *writer* for tests: recordings with known truth, built packet by packet.

Three layers:

* :func:`write_mjr` writes any variant (legacy ``MEETECHO``, ``MJR00001``, ``MJR00002``) with
  any header, frames given as bytes (or ``(arrival ms, bytes)`` for ``MJR00002``).
* Media helpers make real codec payloads with PyAV encoders (Opus at 10/20/40/60 ms, VP8,
  H.264, G.711 µ/A-law, G.722, L16) plus the RTP packetizers a WebRTC sender would use
  (VP8 payload descriptor, H.264 single NAL / STAP-A / FU-A, RED); sync markers too: a tone
  that doubles its frequency at chosen instants (:func:`marker_tone`, encoded by
  :func:`opus_signal_packets`) and solid pictures with white flashes (:func:`flash_pictures`).
* :class:`Stream` is a list of RTP packets with send-order indices and arrival times; tests
  edit it (reorder, duplicate, drop, SSRC change, timestamp jumps, pauses, clock skew,
  extensions, CSRCs, padding) and write it as a recording. Video pictures come at a constant
  rate or at any RTP times given (``Stream.video(..., ticks=...)``).

The RTP serialiser here is written independently of ``melter.mjr.rtp`` so that parsing is
checked against a second implementation, not against itself.
"""

from __future__ import annotations

import copy
import functools
import json
import random
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

#: Wall clock of the first packet of generated recordings (µs since the epoch, 2026-11-26).
T0_US = 1_795_700_000_000_000

LEGACY = "MEETECHO"
V1 = "MJR00001"
V2 = "MJR00002"

URI_AUDIO_LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
URI_VIDEO_ORIENTATION = "urn:3gpp:video-orientation"
URI_MID = "urn:ietf:params:rtp-hdrext:sdes:mid"

CLOCK_RATES = {
    "opus": 48000,
    "multiopus": 48000,
    "g711": 8000,
    "pcmu": 8000,
    "pcma": 8000,
    "g722": 8000,
    "l16": 16000,
    "l16-48": 48000,
    "vp8": 90000,
    "vp9": 90000,
    "h264": 90000,
    "h265": 90000,
    "av1": 90000,
}


# -- file level ------------------------------------------------------------------------------
def frame_bytes(data: bytes, variant: str = V2, arrival_ms: int = 0) -> bytes:
    """One stored frame: its prefix and payload, as the given variant writes it."""
    if variant == V2:
        return b"MEET" + struct.pack("!IH", arrival_ms & 0xFFFFFFFF, len(data) & 0xFFFF) + data
    return b"MEETECHO" + struct.pack("!H", len(data) & 0xFFFF) + data


def header_bytes(header: dict[str, Any] | str | bytes, variant: str = V2) -> bytes:
    """Magic, u16 length and header body.

    ``header`` is the JSON object (MJR0000x), the kind word ``audio``/``video`` (legacy), or
    raw bytes written as the body whatever the variant (for broken headers).
    """
    if isinstance(header, bytes):
        body = header
    elif isinstance(header, str):
        body = header.encode()
    else:
        body = json.dumps(header, separators=(",", ":")).encode()
    return variant.encode() + struct.pack("!H", len(body)) + body


def make_header(
    kind: str = "a",
    codec: str = "opus",
    *,
    fmtp: str | None = None,
    description: str | None = None,
    extensions: dict[int, str] | None = None,
    created_us: int | None = None,
    first_us: int | None = None,
    red_pt: int | None = None,
    encrypted: bool | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The JSON header in Janus's field order (t c f d x s u), optional fields left out."""
    header: dict[str, Any] = {"t": kind[0], "c": codec}
    if fmtp is not None:
        header["f"] = fmtp
    if description is not None:
        header["d"] = description
    if extensions:
        header["x"] = {str(k): v for k, v in extensions.items()}
    first = T0_US if first_us is None else first_us
    header["s"] = first - 40_000 if created_us is None else created_us
    header["u"] = first
    if red_pt is not None:
        header["or"] = red_pt
    if encrypted is not None:
        header["e"] = encrypted
    header.update(extra)
    return header


def write_mjr(
    path: str | Path,
    header: dict[str, Any] | str | bytes,
    frames: Iterable[bytes | tuple[int, bytes]],
    variant: str = V2,
) -> Path:
    """Write a recording; returns its path.

    A frame is its bytes, or ``(arrival ms, bytes)``; arrival times are written by ``MJR00002``
    only (bare bytes get 0 ms there).
    """
    path = Path(path)
    out = bytearray(header_bytes(header, variant))
    for frame in frames:
        if isinstance(frame, tuple):
            arrival_ms, data = frame
        else:
            arrival_ms, data = 0, frame
        out += frame_bytes(data, variant, arrival_ms)
    path.write_bytes(bytes(out))
    return path


def frame_offsets(path: str | Path) -> list[int]:
    """Byte offsets of every frame prefix of a well-formed file (to aim damage precisely)."""
    data = Path(path).read_bytes()
    pos = 10 + struct.unpack_from("!H", data, 8)[0]
    offsets = []
    while pos + 10 <= len(data):
        offsets.append(pos)
        length = struct.unpack_from("!H", data, pos + 8)[0]  # both prefixes end in u16 len
        pos += 10 + length
    return offsets


# -- RTP ---------------------------------------------------------------------------------------
def extension_block(elements: dict[int, bytes], two_byte: bool = False) -> bytes:
    """RFC 8285 extension header (profile, length in words) and its padded elements."""
    body = bytearray()
    if two_byte:
        profile = 0x1000
        for ext_id, value in elements.items():
            body += bytes((ext_id, len(value))) + value
    else:
        profile = 0xBEDE
        for ext_id, value in elements.items():
            assert 1 <= ext_id <= 14 and 1 <= len(value) <= 16, (ext_id, value)
            body.append((ext_id << 4) | (len(value) - 1))
            body += value
    body += b"\x00" * (-len(body) % 4)
    return struct.pack("!HH", profile, len(body) // 4) + bytes(body)


def rtp_bytes(
    pt: int,
    seq: int,
    ts: int,
    ssrc: int,
    payload: bytes,
    *,
    marker: bool = False,
    csrcs: Sequence[int] = (),
    extensions: dict[int, bytes] | None = None,
    two_byte: bool = False,
    padding: int = 0,
) -> bytes:
    """An RTP packet (RFC 3550) with optional CSRCs, RFC 8285 extensions and padding."""
    b0 = 0x80 | len(csrcs)
    if extensions:
        b0 |= 0x10
    if padding:
        b0 |= 0x20
    out = bytearray(
        struct.pack(
            "!BBHII",
            b0,
            (0x80 if marker else 0) | (pt & 0x7F),
            seq & 0xFFFF,
            ts & 0xFFFFFFFF,
            ssrc & 0xFFFFFFFF,
        )
    )
    for csrc in csrcs:
        out += struct.pack("!I", csrc)
    if extensions:
        out += extension_block(extensions, two_byte)
    out += payload
    if padding:
        out += b"\x00" * (padding - 1) + bytes((padding,))
    return bytes(out)


def audio_level_value(level_dbov: int, voice: bool = False) -> bytes:
    """RFC 6464 element: V bit and the level in -dBov (0..127)."""
    return bytes(((0x80 if voice else 0) | (abs(level_dbov) & 0x7F),))


def orientation_value(degrees: int, flip: bool = False, front_camera: bool = False) -> bytes:
    """3GPP CVO element: C F R1 R0 (rotation clockwise in 90° steps)."""
    return bytes(((0x08 if front_camera else 0) | (0x04 if flip else 0) | (degrees // 90 % 4),))


# -- audio media -------------------------------------------------------------------------------
def sine(seconds: float, freq: float, rate: int, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def _encode_audio(
    encoder: str, samples: np.ndarray, rate: int, frame_size: int, options: dict[str, str]
) -> list[bytes]:
    ctx = av.CodecContext.create(encoder, "w")
    ctx.sample_rate = rate
    ctx.layout = "mono"
    ctx.format = "s16"
    if options:
        ctx.options = options
    ctx.open()
    pcm = np.clip(samples * 32767, -32768, 32767).astype(np.int16)
    out: list[bytes] = []
    size = ctx.frame_size or frame_size
    for pos in range(0, len(pcm) - size + 1, size):
        frame = av.AudioFrame.from_ndarray(pcm[pos : pos + size].reshape(1, -1), "s16", "mono")
        frame.sample_rate = rate
        frame.pts = pos
        out += [bytes(p) for p in ctx.encode(frame)]
    out += [bytes(p) for p in ctx.encode(None)]
    return out


@functools.lru_cache(maxsize=64)
def opus_packets(
    seconds: float, freq: float = 440.0, frame_ms: int = 20, amplitude: float = 0.3
) -> tuple[bytes, ...]:
    """Real Opus packets (libopus, mono) of a sine; exactly ``seconds / frame_ms`` of them."""
    count = round(seconds * 1000 / frame_ms)
    samples = sine(seconds + 0.2, freq, 48000, amplitude)
    packets = _encode_audio(
        "libopus",
        samples,
        48000,
        48 * frame_ms,
        {"frame_duration": str(frame_ms), "application": "audio", "b": "32000"},
    )
    assert len(packets) >= count, (len(packets), count)
    return tuple(packets[:count])


def opus_signal_packets(samples: np.ndarray, frame_ms: int = 20) -> tuple[bytes, ...]:
    """Real Opus packets (libopus, mono, 48 kHz) of any signal; one per whole ``frame_ms``.

    Decoded with OpusHead's pre-skip (as Melter's containers say), the audio lines up with
    ``samples``: sample ``n`` plays ``n / 48000`` s after the first packet's RTP time.
    """
    size = 48 * frame_ms
    count = len(samples) // size
    padded = np.concatenate([np.asarray(samples, dtype=np.float64), np.zeros(9600)])
    packets = _encode_audio(
        "libopus",
        padded,
        48000,
        size,
        {"frame_duration": str(frame_ms), "application": "audio", "b": "32000"},
    )
    assert len(packets) >= count, (len(packets), count)
    return tuple(packets[:count])


def marker_tone(
    seconds: float,
    freq: float,
    markers: Sequence[float],
    rate: int = 48000,
    amplitude: float = 0.3,
    length: float = 0.1,
) -> np.ndarray:
    """A sine at ``freq`` that doubles its frequency for ``length`` s from each marker time
    (seconds from the first sample), phase-continuous so the switch makes no click."""
    count = round(seconds * rate)
    frequency = np.full(count, float(freq))
    for marker in markers:
        first = round(marker * rate)
        frequency[max(0, first) : max(0, first + round(length * rate))] = 2 * freq
    # The phase reached at each sample's start: sample n is sin(2 pi sum_{k<n} f_k / rate).
    phase = 2 * np.pi * np.concatenate([[0.0], np.cumsum(frequency[:-1])]) / rate
    return amplitude * np.sin(phase)


def opus_silence_packet(frame_ms: int = 20) -> bytes:
    """A tiny CELT packet like the ones DTX senders emit (decodes to silence)."""
    toc = {10: 0xF0, 20: 0xF8}[frame_ms]
    return bytes((toc, 0xFF, 0xFE))


@functools.lru_cache(maxsize=16)
def g711_payloads(
    seconds: float, freq: float = 1000.0, law: str = "mulaw", ptime_ms: int = 20
) -> tuple[bytes, ...]:
    """G.711 payloads (PyAV's pcm_mulaw / pcm_alaw encoders), 8 bytes a millisecond."""
    data = b"".join(_encode_audio(f"pcm_{law}", sine(seconds, freq, 8000), 8000, 160, {}))
    size = 8 * ptime_ms
    return tuple(data[pos : pos + size] for pos in range(0, len(data) - size + 1, size))


@functools.lru_cache(maxsize=16)
def g722_payloads(seconds: float, freq: float = 1000.0, ptime_ms: int = 20) -> tuple[bytes, ...]:
    """G.722 payloads (PyAV's g722 encoder, 16 kHz audio), 8 bytes a millisecond."""
    data = b"".join(_encode_audio("g722", sine(seconds + 0.1, freq, 16000), 16000, 320, {}))
    size = 8 * ptime_ms
    count = round(seconds * 1000 / ptime_ms)
    chunks = [data[pos : pos + size] for pos in range(0, len(data) - size + 1, size)]
    assert len(chunks) >= count
    return tuple(chunks[:count])


def l16_payloads(
    seconds: float, freq: float = 1000.0, rate: int = 16000, ptime_ms: int = 20
) -> tuple[bytes, ...]:
    """Linear 16-bit big-endian PCM payloads (RFC 3551 L16), mono."""
    pcm = np.clip(sine(seconds, freq, rate) * 32767, -32768, 32767).astype(">i2").tobytes()
    size = 2 * rate * ptime_ms // 1000
    return tuple(pcm[pos : pos + size] for pos in range(0, len(pcm) - size + 1, size))


# -- video media -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Picture:
    data: bytes
    keyframe: bool
    width: int
    height: int


def _video_frames(
    count: int, size: tuple[int, int], color: tuple[int, int, int], split: bool
) -> Iterable[av.VideoFrame]:
    width, height = size
    for index in range(count):
        image = np.empty((height, width, 3), np.uint8)
        image[:] = color
        if split:  # left half red, right half blue: shows which way a picture is turned
            image[:, : width // 2] = (220, 30, 30)
            image[:, width // 2 :] = (30, 30, 220)
        # a small moving block so inter frames are not empty
        x = (index * 8) % max(1, width - 16)
        image[4:20, x : x + 16] = (255, 255, 255)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
        frame.pts = index
        yield frame


def _encode_video(
    encoder: str,
    count: int,
    size: tuple[int, int],
    color: tuple[int, int, int],
    fps: int,
    gop: int,
    options: dict[str, str],
    split: bool = False,
) -> tuple[Picture, ...]:
    ctx = av.CodecContext.create(encoder, "w")
    ctx.width, ctx.height = size
    ctx.pix_fmt = "yuv420p"
    ctx.time_base = Fraction(1, fps)
    ctx.framerate = fps
    ctx.gop_size = gop
    ctx.bit_rate = 400_000
    ctx.options = options
    ctx.open()
    out: list[Picture] = []
    for frame in _video_frames(count, size, color, split):
        out += [Picture(bytes(p), bool(p.is_keyframe), *size) for p in ctx.encode(frame)]
    out += [Picture(bytes(p), bool(p.is_keyframe), *size) for p in ctx.encode(None)]
    assert len(out) == count, (len(out), count)
    return tuple(out)


@functools.lru_cache(maxsize=32)
def vp8_pictures(
    count: int,
    size: tuple[int, int] = (320, 240),
    color: tuple[int, int, int] = (20, 160, 160),
    fps: int = 15,
    gop: int = 15,
    split: bool = False,
) -> tuple[Picture, ...]:
    """VP8 frames (libvpx, realtime) with a key frame every ``gop`` pictures."""
    options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "auto-alt-ref": "0"}
    return _encode_video("libvpx", count, size, color, fps, gop, options, split)


@functools.lru_cache(maxsize=16)
def h264_pictures(
    count: int,
    size: tuple[int, int] = (320, 240),
    color: tuple[int, int, int] = (20, 160, 160),
    fps: int = 15,
    gop: int = 15,
) -> tuple[Picture, ...]:
    """H.264 constrained-baseline access units (Annex B), SPS/PPS in front of each IDR."""
    options = {
        "preset": "ultrafast",
        "tune": "zerolatency",
        "profile": "baseline",
        "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:repeat-headers=1:log-level=none",
    }
    return _encode_video("libx264", count, size, color, fps, gop, options)


@functools.lru_cache(maxsize=64)
def flash_pictures(
    codec: str,
    count: int,
    color: tuple[int, int, int],
    white: frozenset[int] = frozenset(),
    size: tuple[int, int] = (320, 240),
    gop: int = 60,
) -> tuple[Picture, ...]:
    """Solid ``color`` pictures (VP8 or H.264, as :func:`vp8_pictures` / :func:`h264_pictures`
    encode them), all white at the numbers in ``white``: sync flashes with no moving parts."""
    width, height = size
    if codec == "vp8":
        encoder = "libvpx"
        options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0",
                   "auto-alt-ref": "0"}
    elif codec == "h264":
        encoder = "libx264"
        options = {
            "preset": "ultrafast",
            "tune": "zerolatency",
            "profile": "baseline",
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:repeat-headers=1"
                           ":log-level=none",
        }
    else:
        raise ValueError(codec)
    ctx = av.CodecContext.create(encoder, "w")
    assert isinstance(ctx, av.VideoCodecContext)
    ctx.width, ctx.height = size
    ctx.pix_fmt = "yuv420p"
    ctx.time_base = Fraction(1, 30)
    ctx.framerate = Fraction(30)
    ctx.gop_size = gop
    ctx.bit_rate = 400_000
    ctx.options = options
    ctx.open()
    out: list[Picture] = []
    for index in range(count):
        image = np.empty((height, width, 3), np.uint8)
        image[:] = (255, 255, 255) if index in white else color
        frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
        frame.pts = index
        out += [Picture(bytes(p), bool(p.is_keyframe), *size) for p in ctx.encode(frame)]
    out += [Picture(bytes(p), bool(p.is_keyframe), *size) for p in ctx.encode(None)]
    assert len(out) == count and out[0].keyframe, (len(out), count)
    return tuple(out)


def vp8_descriptor(start: bool, picture_id: int | None = None, partition: int = 0) -> bytes:
    """RFC 7741 payload descriptor: X, S, PID and an optional 15-bit picture id."""
    first = (0x10 if start else 0) | (partition & 0x07)
    if picture_id is None:
        return bytes((first,))
    pid = picture_id & 0x7FFF
    return bytes((first | 0x80, 0x80, 0x80 | (pid >> 8), pid & 0xFF))


def packetize_vp8(frame: bytes, picture_id: int | None = 0, mtu: int = 1200) -> list[bytes]:
    """A VP8 frame as RTP payloads: the first starts partition 0, the rest continue it."""
    size = mtu - len(vp8_descriptor(True, picture_id))
    chunks = [frame[pos : pos + size] for pos in range(0, len(frame), size)] or [b""]
    return [vp8_descriptor(index == 0, picture_id) + chunk for index, chunk in enumerate(chunks)]


def split_annexb(data: bytes) -> list[bytes]:
    """NAL units of an Annex-B access unit (3- or 4-byte start codes)."""
    units = []
    pos = data.find(b"\x00\x00\x01")
    while pos != -1:
        start = pos + 3
        nxt = data.find(b"\x00\x00\x01", start)
        end = len(data) if nxt == -1 else nxt
        unit = data[start:end]
        if nxt != -1 and unit.endswith(b"\x00"):
            unit = unit[:-1]  # the leading zero of a 4-byte start code
        if unit:
            units.append(unit)
        pos = nxt
    return units


def packetize_h264(access_unit: bytes, mtu: int = 1200, aggregate: bool = True) -> list[bytes]:
    """RFC 6184 packetization mode 1: small units in STAP-A, big ones as FU-A, else single."""
    units = split_annexb(access_unit)
    payloads: list[bytes] = []
    pending: list[bytes] = []

    def flush() -> None:
        if len(pending) == 1:
            payloads.append(pending[0])
        elif pending:
            nri = max(unit[0] & 0x60 for unit in pending)
            body = b"".join(struct.pack("!H", len(unit)) + unit for unit in pending)
            payloads.append(bytes((nri | 24,)) + body)
        pending.clear()

    for unit in units:
        if len(unit) > mtu:
            flush()
            header, body = unit[0], unit[1:]
            step = mtu - 2
            pieces = [body[pos : pos + step] for pos in range(0, len(body), step)]
            for index, piece in enumerate(pieces):
                fu = (header & 0x1F) | (0x80 if index == 0 else 0)
                fu |= 0x40 if index == len(pieces) - 1 else 0
                payloads.append(bytes(((header & 0xE0) | 28, fu)) + piece)
        elif aggregate and sum(len(u) + 2 for u in pending) + len(unit) + 3 <= mtu:
            pending.append(unit)
        else:
            flush()
            pending.append(unit)
    flush()
    return payloads


def red_payload(primary_pt: int, primary: bytes, redundant: Sequence[tuple[int, bytes]]) -> bytes:
    """RFC 2198 RED: ``redundant`` as ``(timestamp offset, data)`` oldest first."""
    out = bytearray()
    for offset, data in redundant:
        out += struct.pack("!I", 0x80000000 | (primary_pt << 24) | (offset << 10) | len(data))
    out.append(primary_pt & 0x7F)
    for _, data in redundant:
        out += data
    return bytes(out + primary)


def data_payload(wall_us: int, message: bytes) -> bytes:
    """A data-channel frame: i64 big-endian wall-clock µs, then the message."""
    return struct.pack("!q", wall_us) + message


# -- streams -----------------------------------------------------------------------------------
@dataclass
class Packet:
    """One RTP packet of a generated stream; ``index`` is its place in sending order."""

    index: int
    seq: int
    ts: int
    payload: bytes
    arrival_us: int
    ssrc: int = 0x11223344
    pt: int = 111
    marker: bool = False
    duration: int = 0  # RTP ticks this packet's media lasts (audio)
    csrcs: tuple[int, ...] = ()
    extensions: dict[int, bytes] = field(default_factory=dict)
    two_byte: bool = False
    padding: int = 0
    sent_us: int = -1  # when the sender sent it on the receiver's clock (arrival sans delay)

    def __post_init__(self) -> None:
        if self.sent_us < 0:
            self.sent_us = self.arrival_us

    def to_bytes(self) -> bytes:
        return rtp_bytes(
            self.pt,
            self.seq,
            self.ts,
            self.ssrc,
            self.payload,
            marker=self.marker,
            csrcs=self.csrcs,
            extensions=self.extensions or None,
            two_byte=self.two_byte,
            padding=self.padding,
        )


class Stream:
    """RTP packets in file (arrival) order, editable; every edit returns ``self``.

    Positions given to edits are *send-order indices* (``Packet.index``), so edits compose
    whatever was reordered or dropped before.
    """

    def __init__(self, packets: list[Packet], kind: str, codec: str, clock_rate: int) -> None:
        self.packets = packets
        self.kind = kind
        self.codec = codec
        self.clock_rate = clock_rate
        self.header_extensions: dict[int, str] = {}

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def audio(
        cls,
        payloads: Sequence[bytes],
        ticks: int | Sequence[int],
        *,
        codec: str = "opus",
        clock_rate: int | None = None,
        pt: int = 111,
        ssrc: int = 0x11223344,
        seq: int = 1,
        ts: int = 0,
        start_us: int = T0_US,
    ) -> Stream:
        """One packet per payload, ``ticks`` RTP ticks apart; arrivals follow the media clock."""
        clock = clock_rate or CLOCK_RATES[codec]
        steps = [ticks] * len(payloads) if isinstance(ticks, int) else list(ticks)
        packets = []
        elapsed = 0
        for index, (payload, step) in enumerate(zip(payloads, steps, strict=True)):
            packets.append(
                Packet(
                    index,
                    (seq + index) & 0xFFFF,
                    (ts + elapsed) & 0xFFFFFFFF,
                    payload,
                    start_us + round(elapsed * 1_000_000 / clock),
                    ssrc=ssrc,
                    pt=pt,
                    duration=step,
                )
            )
            elapsed += step
        return cls(packets, "audio", codec, clock)

    @classmethod
    def opus(cls, seconds: float, freq: float = 440.0, frame_ms: int = 20, **kw: Any) -> Stream:
        payloads = opus_packets(seconds, freq, frame_ms)
        return cls.audio(payloads, 48 * frame_ms, codec="opus", **kw)

    @classmethod
    def video(
        cls,
        pictures: Sequence[Sequence[bytes]],
        *,
        codec: str = "vp8",
        fps: float = 15,
        pt: int = 96,
        ssrc: int = 0x55667788,
        seq: int = 1,
        ts: int = 0,
        start_us: int = T0_US,
        ticks: Sequence[int] | None = None,
    ) -> Stream:
        """Each picture is the list of its payloads: same timestamp, marker on the last.

        Pictures come ``1/fps`` apart, or at ``ticks`` (90 kHz, one per picture, from the
        first picture: any spacing); each arrives at its own time after ``start_us``.
        """
        if ticks is not None:
            assert len(ticks) == len(pictures) and ticks[0] == 0, (len(ticks), len(pictures))
        packets = []
        index = 0
        for number, payloads in enumerate(pictures):
            if ticks is None:
                offset = round(number * 90000 / fps)
                arrival = start_us + round(number * 1_000_000 / fps)
                interval = round(90000 / fps)
            else:
                offset = ticks[number]
                arrival = start_us + round(offset * 1_000_000 / 90000)
                following = ticks[number + 1] if number + 1 < len(ticks) else None
                interval = following - offset if following is not None else round(90000 / fps)
            for part, payload in enumerate(payloads):
                packets.append(
                    Packet(
                        index,
                        (seq + index) & 0xFFFF,
                        (ts + offset) & 0xFFFFFFFF,
                        payload,
                        arrival,
                        ssrc=ssrc,
                        pt=pt,
                        marker=part == len(payloads) - 1,
                        duration=interval,
                    )
                )
                index += 1
        return cls(packets, "video", codec, 90000)

    @classmethod
    def vp8(
        cls, pictures: Sequence[Picture], mtu: int = 1200, picture_id: int = 100, **kw: Any
    ) -> Stream:
        payloads = [
            packetize_vp8(p.data, (picture_id + n) & 0x7FFF, mtu) for n, p in enumerate(pictures)
        ]
        return cls.video(payloads, codec="vp8", **kw)

    @classmethod
    def h264(cls, pictures: Sequence[Picture], mtu: int = 1200, **kw: Any) -> Stream:
        kw.setdefault("pt", 107)
        return cls.video([packetize_h264(p.data, mtu) for p in pictures], codec="h264", **kw)

    def copy(self) -> Stream:
        twin = Stream(copy.deepcopy(self.packets), self.kind, self.codec, self.clock_rate)
        twin.header_extensions = dict(self.header_extensions)
        return twin

    # -- lookup ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.packets)

    def _position(self, index: int) -> int:
        for position, packet in enumerate(self.packets):
            if packet.index == index:
                return position
        raise KeyError(index)

    def _from(self, index: int) -> list[Packet]:
        return [p for p in self.packets if p.index >= index]

    def by_index(self, index: int) -> Packet:
        return self.packets[self._position(index)]

    @property
    def first_arrival_us(self) -> int:
        return min(p.arrival_us for p in self.packets)

    @property
    def first_sent_us(self) -> int:
        return min(p.sent_us for p in self.packets)

    @property
    def wall_end_us(self) -> int:
        """Arrival of the last-sent packet plus its media duration (audio) or frame interval."""
        last = max(self.packets, key=lambda p: p.index)
        return last.sent_us + round(last.duration * 1_000_000 / self.clock_rate)

    @property
    def wall_span_us(self) -> int:
        """Wall-clock span of the media: first sent to the end of the last one."""
        return self.wall_end_us - self.first_sent_us

    # -- edits -------------------------------------------------------------------------------
    def drop(self, *indices: int) -> Stream:
        """Loss: the packets never reached Janus."""
        gone = set(indices)
        self.packets = [p for p in self.packets if p.index not in gone]
        return self

    def _settle(self) -> None:
        """Arrival times rise in file order: a packet overtaken by later ones arrives after
        them (it is delayed, never early)."""
        latest = -(1 << 62)
        for packet in self.packets:
            latest = max(latest, packet.arrival_us)
            packet.arrival_us = latest

    def duplicate(self, index: int, later: int = 1) -> Stream:
        """A second copy of a packet, arriving ``later`` packets after the first."""
        position = self._position(index)
        twin = copy.deepcopy(self.packets[position])
        self.packets.insert(min(len(self.packets), position + 1 + later), twin)
        self._settle()
        return self

    def permute(self, order: Sequence[int]) -> Stream:
        """Put the packets in ``order`` (positions into the current list)."""
        assert sorted(order) == list(range(len(self.packets)))
        self.packets = [self.packets[i] for i in order]
        self._settle()
        return self

    def swap(self, first: int, second: int) -> Stream:
        """Exchange the arrival places of two packets (send indices)."""
        order = list(range(len(self.packets)))
        a, b = self._position(first), self._position(second)
        order[a], order[b] = order[b], order[a]
        return self.permute(order)

    def delay(self, index: int, by: int) -> Stream:
        """Packet ``index`` arrives after the ``by`` packets that follow it."""
        order = list(range(len(self.packets)))
        position = self._position(index)
        order.insert(min(len(order) - 1, position + by), order.pop(position))
        return self.permute(order)

    def shuffle(self, rng: random.Random, window: int, keep_first: bool = True) -> Stream:
        """Reorder within a window: each packet moves fewer than ``window`` places.

        ``keep_first`` leaves the first packet first (the track's reference).
        """
        start = 1 if keep_first else 0
        keys = [p + rng.uniform(0, window) for p in range(len(self.packets) - start)]
        rest = sorted(range(len(keys)), key=keys.__getitem__)
        return self.permute(list(range(start)) + [start + i for i in rest])

    def ssrc_change(
        self, at: int, ssrc: int, seq: int | None = None, ts: int | None = None
    ) -> Stream:
        """From packet ``at`` on, a new sender: new SSRC and sequence numbers.

        ``ts=None`` keeps the media clock running across the change (what Janus's header
        rewriting gives); a number restarts the timestamps there.
        """
        later = sorted(self._from(at), key=lambda p: p.index)
        if not later:
            return self
        base_seq = later[0].seq if seq is None else seq
        base_ts = later[0].ts
        for packet in later:
            packet.ssrc = ssrc
            packet.seq = (base_seq + packet.index - at) & 0xFFFF
            if ts is not None:
                packet.ts = (ts + packet.ts - base_ts) & 0xFFFFFFFF
        return self

    def ts_jump(self, at: int, delta: int) -> Stream:
        """Timestamps jump by ``delta`` ticks from packet ``at`` on (arrivals do not)."""
        for packet in self._from(at):
            packet.ts = (packet.ts + delta) & 0xFFFFFFFF
        return self

    def ts_reset(self, at: int, new_ts: int = 0) -> Stream:
        """Timestamps restart at ``new_ts`` from packet ``at`` on."""
        base = self.by_index(at).ts
        return self.ts_jump(at, (new_ts - base) & 0xFFFFFFFF)

    def seq_jump(self, at: int, delta: int) -> Stream:
        for packet in self._from(at):
            packet.seq = (packet.seq + delta) & 0xFFFF
        return self

    def pause(self, at: int, seconds: float, ts_runs: bool = True) -> Stream:
        """No packets for ``seconds`` before packet ``at``.

        ``ts_runs=True``: the RTP clock kept running (Janus-style rewrite, or DTX); ``False``:
        the sender stopped its clock and resumed where it left off (stop/resume).
        """
        shift = round(seconds * 1_000_000)
        for packet in self._from(at):
            packet.arrival_us += shift
            packet.sent_us += shift
            if ts_runs:
                packet.ts = (packet.ts + round(seconds * self.clock_rate)) & 0xFFFFFFFF
        self._settle()
        return self

    def skew(self, ppm: float) -> Stream:
        """The receiving host's clock runs ``ppm`` faster than the sender's media clock."""
        origin = self.first_sent_us
        factor = 1 + ppm * 1e-6
        for packet in self.packets:
            packet.arrival_us = origin + round((packet.arrival_us - origin) * factor)
            packet.sent_us = origin + round((packet.sent_us - origin) * factor)
        return self

    def jitter(self, rng: random.Random, max_ms: float) -> Stream:
        """Random network delay up to ``max_ms`` (arrival order kept)."""
        latest = 0
        for packet in self.packets:
            arrival = packet.arrival_us + round(rng.uniform(0, max_ms) * 1000)
            latest = max(latest, arrival)
            packet.arrival_us = latest
        return self

    def extension(
        self,
        ext_id: int,
        value: bytes | Callable[[Packet], bytes | None],
        *,
        two_byte: bool = False,
        uri: str | None = None,
        since: int = 0,
    ) -> Stream:
        """Add an RFC 8285 element to every packet from ``since`` (``uri`` maps it in ``x``)."""
        for packet in self._from(since):
            element = value(packet) if callable(value) else value
            if element is not None:
                packet.extensions[ext_id] = element
                packet.two_byte = packet.two_byte or two_byte
        if uri is not None:
            self.header_extensions[ext_id] = uri
        return self

    def audio_levels(
        self, ext_id: int, levels: Sequence[int], *, two_byte: bool = False, mapped: bool = True
    ) -> Stream:
        """RFC 6464 levels (-dBov), cycling through ``levels`` by send index."""
        return self.extension(
            ext_id,
            lambda p: audio_level_value(levels[p.index % len(levels)]),
            two_byte=two_byte,
            uri=URI_AUDIO_LEVEL if mapped else None,
        )

    def orientation(
        self, ext_id: int, degrees: int, flip: bool = False, since: int = 0, mapped: bool = True
    ) -> Stream:
        """Video orientation (CVO) on the last packet of each picture from ``since`` on."""
        return self.extension(
            ext_id,
            lambda p: orientation_value(degrees, flip) if p.marker else None,
            uri=URI_VIDEO_ORIENTATION if mapped else None,
            since=since,
        )

    def set_csrcs(self, csrcs: Sequence[int]) -> Stream:
        for packet in self.packets:
            packet.csrcs = tuple(csrcs)
        return self

    def set_padding(self, padding: int) -> Stream:
        for packet in self.packets:
            packet.padding = padding
        return self

    # -- output ------------------------------------------------------------------------------
    def frames(self, first_us: int | None = None) -> list[tuple[int, bytes]]:
        """``(arrival ms since first_us, RTP bytes)`` in file order."""
        base = self.packets[0].arrival_us if first_us is None else first_us
        return [(max(0, (p.arrival_us - base) // 1000), p.to_bytes()) for p in self.packets]

    def header(self, **fields: Any) -> dict[str, Any]:
        fields.setdefault("extensions", self.header_extensions or None)
        fields.setdefault("first_us", self.packets[0].arrival_us)
        return make_header(self.kind[0], self.codec, **fields)

    def write(self, path: str | Path, variant: str = V2, **fields: Any) -> Path:
        """Write as a recording; header ``fields`` as for :func:`make_header`."""
        if variant == LEGACY:
            return write_mjr(path, self.kind, [data for _, data in self.frames()], LEGACY)
        header = self.header(**fields)
        return write_mjr(path, header, self.frames(header["u"]), variant)


def data_recording(
    path: str | Path,
    messages: Sequence[tuple[int, bytes]],
    codec: str = "text",
    variant: str = V2,
) -> Path:
    """A data-channel recording; ``messages`` as ``(wall µs, bytes)``."""
    first = messages[0][0] if messages else T0_US
    header = make_header("d", codec, first_us=first)
    frames = [((when - first) // 1000, data_payload(when, msg)) for when, msg in messages]
    return write_mjr(path, header, frames, variant)
