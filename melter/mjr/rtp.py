"""RTP packets as Janus stores them: fixed header, CSRCs, RFC 8285 extensions, padding.

Parsing and serialising are symmetric (``RtpPacket.parse(bytes(p)) == p``) so tests can build
packets with the same class the reader uses. Errors are ``ValueError`` naming the field cut.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

_FIXED = struct.Struct("!BBHII")
_EXT_HEADER = struct.Struct("!HH")

ONE_BYTE_PROFILE = 0xBEDE
TWO_BYTE_PROFILE_MASK = 0xFFF0
TWO_BYTE_PROFILE = 0x1000

URI_AUDIO_LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
URI_VIDEO_ORIENTATION = "urn:3gpp:video-orientation"


def parse_extensions(profile: int, data: bytes) -> dict[int, bytes]:
    """Split an RFC 8285 extension block into ``{id: value}``.

    Unknown profiles (RFC 3550 generic extensions) give an empty map: their contents have no
    element structure to read.
    """
    elements: dict[int, bytes] = {}
    pos = 0
    end = len(data)
    if profile == ONE_BYTE_PROFILE:
        while pos < end:
            byte = data[pos]
            if byte == 0:  # padding
                pos += 1
                continue
            ext_id = byte >> 4
            if ext_id == 15:  # reserved: stop parsing (RFC 8285 §4.2)
                break
            length = (byte & 0x0F) + 1
            if pos + 1 + length > end:
                raise ValueError(f"one-byte extension id {ext_id} is cut")
            elements[ext_id] = data[pos + 1 : pos + 1 + length]
            pos += 1 + length
    elif profile & TWO_BYTE_PROFILE_MASK == TWO_BYTE_PROFILE:
        while pos < end:
            ext_id = data[pos]
            if ext_id == 0:
                pos += 1
                continue
            if pos + 2 > end:
                raise ValueError(f"two-byte extension id {ext_id} has no length")
            length = data[pos + 1]
            if pos + 2 + length > end:
                raise ValueError(f"two-byte extension id {ext_id} is cut")
            elements[ext_id] = data[pos + 2 : pos + 2 + length]
            pos += 2 + length
    return elements


def serialize_extensions(elements: dict[int, bytes], two_byte: bool = False) -> tuple[int, bytes]:
    """The reverse of :func:`parse_extensions`: ``(profile, padded block)``."""
    out = bytearray()
    if not two_byte and all(1 <= k <= 14 and 1 <= len(v) <= 16 for k, v in elements.items()):
        for ext_id, value in elements.items():
            out.append((ext_id << 4) | (len(value) - 1))
            out += value
        profile = ONE_BYTE_PROFILE
    else:
        for ext_id, value in elements.items():
            out += bytes((ext_id, len(value)))
            out += value
        profile = TWO_BYTE_PROFILE
    out += b"\x00" * (-len(out) % 4)
    return profile, bytes(out)


@dataclass(slots=True)
class RtpPacket:
    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int
    payload: bytes = b""
    marker: bool = False
    csrcs: list[int] = field(default_factory=list)
    extension_profile: int | None = None
    extensions: dict[int, bytes] = field(default_factory=dict)
    padding: int = 0

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        if len(data) < 12:
            raise ValueError(f"RTP header is cut ({len(data)} of 12 bytes)")
        b0, b1, seq, ts, ssrc = _FIXED.unpack_from(data)
        if b0 >> 6 != 2:
            raise ValueError(f"RTP version is {b0 >> 6}, not 2")
        pos = 12
        csrcs: list[int] = []
        cc = b0 & 0x0F
        if cc:
            if pos + 4 * cc > len(data):
                raise ValueError("RTP CSRC list is cut")
            csrcs = list(struct.unpack_from(f"!{cc}I", data, pos))
            pos += 4 * cc
        profile: int | None = None
        extensions: dict[int, bytes] = {}
        if b0 & 0x10:
            if pos + 4 > len(data):
                raise ValueError("RTP extension header is cut")
            profile, words = _EXT_HEADER.unpack_from(data, pos)
            pos += 4
            if pos + 4 * words > len(data):
                raise ValueError("RTP extension block is cut")
            extensions = parse_extensions(profile, data[pos : pos + 4 * words])
            pos += 4 * words
        end = len(data)
        padding = 0
        if b0 & 0x20:
            padding = data[-1]
            if padding == 0 or pos + padding > end:
                raise ValueError(f"RTP padding length {padding} is impossible")
            end -= padding
        return cls(
            payload_type=b1 & 0x7F,
            sequence_number=seq,
            timestamp=ts,
            ssrc=ssrc,
            payload=data[pos:end],
            marker=bool(b1 & 0x80),
            csrcs=csrcs,
            extension_profile=profile,
            extensions=extensions,
            padding=padding,
        )

    def __bytes__(self) -> bytes:
        ext_block = b""
        if self.extension_profile is not None or self.extensions:
            two_byte = (
                self.extension_profile is not None
                and self.extension_profile & TWO_BYTE_PROFILE_MASK == TWO_BYTE_PROFILE
            )
            profile, block = serialize_extensions(self.extensions, two_byte)
            ext_block = _EXT_HEADER.pack(profile, len(block) // 4) + block
        b0 = 0x80 | len(self.csrcs)
        if self.padding:
            b0 |= 0x20
        if ext_block:
            b0 |= 0x10
        out = bytearray(
            _FIXED.pack(
                b0,
                (0x80 if self.marker else 0) | self.payload_type,
                self.sequence_number,
                self.timestamp,
                self.ssrc,
            )
        )
        for csrc in self.csrcs:
            out += struct.pack("!I", csrc)
        out += ext_block
        out += self.payload
        if self.padding:
            out += b"\x00" * (self.padding - 1) + bytes((self.padding,))
        return bytes(out)


def audio_level(value: bytes) -> tuple[int, bool]:
    """RFC 6464: ``(level in -dBov, voice activity flag)`` from a one-byte element."""
    return value[0] & 0x7F, bool(value[0] & 0x80)


def video_rotation(value: bytes) -> tuple[int, bool]:
    """3GPP TS 26.114 coordination of video orientation: ``(clockwise degrees, flip)``.

    R1R0 gives the rotation the receiver must apply clockwise to display the picture upright;
    bit F asks for a horizontal flip; bit C marks the front camera.
    """
    byte = value[0]
    return (byte & 0x03) * 90, bool(byte & 0x04)
