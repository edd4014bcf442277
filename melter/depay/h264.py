"""H.264 (RFC 6184): single NAL units, STAP-A and FU-A, to an Annex-B picture.

A picture is a keyframe when it holds an IDR slice, wherever it sits (an IDR inside a STAP-A
next to its SPS and PPS included). The latest SPS and PPS become the stream's extradata, so the
output's profile and level are the sender's, not a dummy encoder's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from melter.depay.base import VideoDepacketizer, VideoFrame, check_payloads, join_nal_units
from melter.depay.bitreader import BitReader, unescape_rbsp

START_CODE = b"\x00\x00\x00\x01"
NAL_IDR = 5
NAL_SPS = 7
NAL_PPS = 8
STAP_A = 24
FU_A = 28
_HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}


def split_payload(payload: bytes) -> tuple[list[bytes], bool, bool]:
    """NAL units in one RTP payload: ``(units, fu_start, fu_end)``.

    For FU-A the unit is a fragment; the caller joins fragments. Single units and STAP-A
    aggregates give whole units with both flags True.
    """
    if not payload:
        raise ValueError("H.264 payload is empty")
    nal_type = payload[0] & 0x1F
    if 1 <= nal_type <= 23:
        return [payload], True, True
    if nal_type == STAP_A:
        units = []
        pos = 1
        while pos + 2 <= len(payload):
            size = int.from_bytes(payload[pos : pos + 2], "big")
            pos += 2
            if size == 0 or pos + size > len(payload):
                raise ValueError(f"STAP-A unit of {size} bytes is cut")
            units.append(payload[pos : pos + size])
            pos += size
        return units, True, True
    if nal_type == FU_A:
        if len(payload) < 2:
            raise ValueError("FU-A header is cut")
        fu = payload[1]
        header = bytes(((payload[0] & 0xE0) | (fu & 0x1F),))
        start, end = bool(fu & 0x80), bool(fu & 0x40)
        return [header + payload[2:] if start else payload[2:]], start, end
    raise ValueError(f"H.264 NAL unit type {nal_type} is not supported (packetization mode 2)")


def sps_dimensions(sps: bytes) -> tuple[int, int]:
    """Picture width and height from an SPS NAL unit (header byte included)."""
    reader = BitReader(unescape_rbsp(sps[1:]))
    profile_idc = reader.bits(8)
    reader.skip(16)  # constraint flags, level_idc
    reader.ue()  # seq_parameter_set_id
    chroma_format_idc = 1
    if profile_idc in _HIGH_PROFILES:
        chroma_format_idc = reader.ue()
        if chroma_format_idc == 3:
            reader.skip(1)
        reader.ue()
        reader.ue()
        reader.skip(1)
        if reader.bit():  # seq_scaling_matrix_present_flag
            for index in range(8 if chroma_format_idc != 3 else 12):
                if reader.bit():
                    size = 16 if index < 6 else 64
                    last = next_scale = 8
                    for _ in range(size):
                        if next_scale:
                            next_scale = (last + reader.se() + 256) % 256
                        last = next_scale or last
    reader.ue()  # log2_max_frame_num_minus4
    poc_type = reader.ue()
    if poc_type == 0:
        reader.ue()
    elif poc_type == 1:
        reader.skip(1)
        reader.se()
        reader.se()
        for _ in range(reader.ue()):
            reader.se()
    reader.ue()  # max_num_ref_frames
    reader.skip(1)
    width_mbs = reader.ue() + 1
    height_units = reader.ue() + 1
    frame_mbs_only = reader.bit()
    if not frame_mbs_only:
        reader.skip(1)
    reader.skip(1)  # direct_8x8_inference
    width = width_mbs * 16
    height = height_units * 16 * (2 - frame_mbs_only)
    if reader.bit():  # frame_cropping_flag
        left, right, top, bottom = reader.ue(), reader.ue(), reader.ue(), reader.ue()
        crop_x = 1 if chroma_format_idc == 0 else (2 if chroma_format_idc in (1, 2) else 1)
        crop_y = 1 if chroma_format_idc in (0, 3) else (2 if chroma_format_idc == 1 else 1)
        crop_y *= 2 - frame_mbs_only
        width -= (left + right) * crop_x
        height -= (top + bottom) * crop_y
    return width, height


class H264Depacketizer(VideoDepacketizer):
    codec_name = "h264"

    def __init__(self) -> None:
        self.sps: bytes | None = None
        self.pps: bytes | None = None

    def assemble(self, payloads: Sequence[bytes]) -> VideoFrame:
        check_payloads(payloads)
        units = join_nal_units(
            payloads, split_payload, lambda p: (p[0] & 0x1F) == FU_A, "H.264 FU-A"
        )
        keyframe = False
        width = height = None
        for unit in units:
            nal_type = unit[0] & 0x1F
            if nal_type == NAL_IDR:
                keyframe = True
            elif nal_type == NAL_SPS:
                self.sps = unit
                with contextlib.suppress(ValueError):  # a size is a nicety, not required
                    width, height = sps_dimensions(unit)
            elif nal_type == NAL_PPS:
                self.pps = unit
        data = b"".join(START_CODE + unit for unit in units)
        return VideoFrame(data, keyframe, width, height)

    def starts_picture(self, payload: bytes) -> bool | None:
        if payload and payload[0] & 0x1F == FU_A and len(payload) > 1:
            return bool(payload[1] & 0x80)
        return True

    def extradata(self) -> bytes | None:
        if self.sps is None or self.pps is None:
            return None
        return START_CODE + self.sps + START_CODE + self.pps
