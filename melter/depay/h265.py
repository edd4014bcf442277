"""H.265 (RFC 7798): single NAL units, aggregation packets and fragmentation units to Annex-B.

Janus negotiates no DONL (sprop-max-don-diff = 0), so neither aggregation nor fragmentation
units carry decoding order numbers. A picture is a keyframe when it holds an IRAP NAL unit
(IDR, CRA or BLA): decoding can start there. The latest VPS, SPS and PPS become the stream's
extradata so the output carries the sender's own parameter sets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from melter.depay.base import VideoDepacketizer, VideoFrame, check_payloads, join_nal_units
from melter.depay.bitreader import BitReader, unescape_rbsp

START_CODE = b"\x00\x00\x00\x01"
NAL_VPS = 32
NAL_SPS = 33
NAL_PPS = 34
AGGREGATION_PACKET = 48
FRAGMENTATION_UNIT = 49
PACI = 50
#: IRAP range: BLA_W_LP (16) .. RSV_IRAP_VCL23 (23); 22 and 23 are reserved IRAP types.
IRAP_TYPES = range(16, 24)


@dataclass(frozen=True, slots=True)
class H265NalHeader:
    """The two-byte NAL unit header, which is also the RTP payload header (RFC 7798 §1.1.4)."""

    nal_type: int
    layer_id: int = 0
    temporal_id_plus1: int = 1
    forbidden: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.nal_type <= 63:
            raise ValueError("H.265 NAL unit type must fit in 6 bits")
        if not 0 <= self.layer_id <= 63:
            raise ValueError("H.265 layer id must fit in 6 bits")
        if not 0 <= self.temporal_id_plus1 <= 7:
            raise ValueError("H.265 TID must fit in 3 bits")

    @classmethod
    def parse(cls, data: bytes) -> tuple[H265NalHeader, bytes]:
        if len(data) < 2:
            raise ValueError("H.265 payload header is cut")
        header = cls(
            nal_type=(data[0] >> 1) & 0x3F,
            layer_id=((data[0] & 0x01) << 5) | (data[1] >> 3),
            temporal_id_plus1=data[1] & 0x07,
            forbidden=bool(data[0] & 0x80),
        )
        return header, data[2:]

    def __bytes__(self) -> bytes:
        first = (0x80 if self.forbidden else 0) | (self.nal_type << 1) | (self.layer_id >> 5)
        return bytes((first, ((self.layer_id & 0x1F) << 3) | self.temporal_id_plus1))


@dataclass(frozen=True, slots=True)
class H265FuHeader:
    """The byte after a fragmentation unit's payload header: S, E and the fragmented type."""

    start: bool
    end: bool
    nal_type: int

    def __post_init__(self) -> None:
        if not 0 <= self.nal_type <= 63:
            raise ValueError("H.265 FU type must fit in 6 bits")

    @classmethod
    def parse(cls, data: bytes) -> tuple[H265FuHeader, bytes]:
        if not data:
            raise ValueError("H.265 FU header is cut")
        byte = data[0]
        return cls(bool(byte & 0x80), bool(byte & 0x40), byte & 0x3F), data[1:]

    def __bytes__(self) -> bytes:
        return bytes(((0x80 if self.start else 0) | (0x40 if self.end else 0) | self.nal_type,))


def split_payload(payload: bytes) -> tuple[list[bytes], bool, bool]:
    """NAL units in one RTP payload: ``(units, fu_start, fu_end)``.

    For a fragmentation unit the one unit is a fragment (the first one with its rebuilt NAL
    header); the caller joins fragments. Single units and aggregation packets give whole units
    with both flags True.
    """
    header, body = H265NalHeader.parse(payload)
    if header.nal_type < AGGREGATION_PACKET:
        return [payload], True, True
    if header.nal_type == AGGREGATION_PACKET:
        units = []
        pos = 0
        while pos < len(body):
            if pos + 2 > len(body):
                raise ValueError("H.265 aggregation unit size is cut")
            size = int.from_bytes(body[pos : pos + 2], "big")
            pos += 2
            if size < 2 or pos + size > len(body):
                raise ValueError(f"H.265 aggregation unit of {size} bytes is cut")
            units.append(body[pos : pos + size])
            pos += size
        if not units:
            raise ValueError("H.265 aggregation packet has no units")
        return units, True, True
    if header.nal_type == FRAGMENTATION_UNIT:
        fu, fragment = H265FuHeader.parse(body)
        if fu.start:
            rebuilt = H265NalHeader(
                fu.nal_type, header.layer_id, header.temporal_id_plus1, header.forbidden
            )
            fragment = bytes(rebuilt) + fragment
        return [fragment], fu.start, fu.end
    raise ValueError(f"H.265 payload type {header.nal_type} is not supported (PACI/reserved)")


def _skip_profile_tier_level(reader: BitReader, max_sub_layers_minus1: int) -> None:
    """profile_tier_level(1, sps_max_sub_layers_minus1), H.265 §7.3.3: only its length matters."""
    reader.skip(96)  # general profile, tier, compatibility, constraint flags, level
    profile_present = []
    level_present = []
    for _ in range(max_sub_layers_minus1):
        profile_present.append(reader.bit())
        level_present.append(reader.bit())
    if max_sub_layers_minus1 > 0:
        reader.skip(2 * (8 - max_sub_layers_minus1))  # reserved_zero_2bits
    for index in range(max_sub_layers_minus1):
        if profile_present[index]:
            reader.skip(88)
        if level_present[index]:
            reader.skip(8)


def sps_dimensions(sps: bytes) -> tuple[int, int]:
    """Displayed picture size from a base-layer SPS NAL unit (header included), H.265 §7.3.2.2.

    The conformance window is taken off: encoders code whole CTBs and crop to the real size.
    """
    reader = BitReader(unescape_rbsp(sps[2:]))
    reader.skip(4)  # sps_video_parameter_set_id
    max_sub_layers_minus1 = reader.bits(3)
    reader.skip(1)  # sps_temporal_id_nesting_flag
    _skip_profile_tier_level(reader, max_sub_layers_minus1)
    reader.ue()  # sps_seq_parameter_set_id
    chroma_format_idc = reader.ue()
    separate_colour_planes = reader.bit() if chroma_format_idc == 3 else 0
    width = reader.ue()
    height = reader.ue()
    if reader.bit():  # conformance_window_flag
        left, right, top, bottom = reader.ue(), reader.ue(), reader.ue(), reader.ue()
        chroma_array_type = 0 if separate_colour_planes else chroma_format_idc
        sub_width = 2 if chroma_array_type in (1, 2) else 1
        sub_height = 2 if chroma_array_type == 1 else 1
        width -= sub_width * (left + right)
        height -= sub_height * (top + bottom)
    if width <= 0 or height <= 0:
        raise ValueError("H.265 SPS conformance window is larger than the picture")
    return width, height


class H265Depacketizer(VideoDepacketizer):
    codec_name = "hevc"

    def __init__(self) -> None:
        self.vps: bytes | None = None
        self.sps: bytes | None = None
        self.pps: bytes | None = None

    def assemble(self, payloads: Sequence[bytes]) -> VideoFrame:
        check_payloads(payloads)
        units = join_nal_units(
            payloads,
            split_payload,
            lambda p: (p[0] >> 1) & 0x3F == FRAGMENTATION_UNIT,
            "H.265 FU",
        )
        keyframe = False
        width = height = None
        for unit in units:
            header, _ = H265NalHeader.parse(unit)
            if header.nal_type in IRAP_TYPES:
                keyframe = True
            elif header.nal_type == NAL_VPS:
                self.vps = unit
            elif header.nal_type == NAL_SPS:
                self.sps = unit
                if header.layer_id == 0:  # layered SPS syntax differs; only size the base
                    with contextlib.suppress(ValueError):
                        width, height = sps_dimensions(unit)
            elif header.nal_type == NAL_PPS:
                self.pps = unit
        data = b"".join(START_CODE + unit for unit in units)
        return VideoFrame(data, keyframe, width, height)

    def extradata(self) -> bytes | None:
        if self.vps is None or self.sps is None or self.pps is None:
            return None
        return START_CODE + self.vps + START_CODE + self.sps + START_CODE + self.pps
