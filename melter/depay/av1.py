"""AV1 (AOM "RTP Payload Format For AV1"): OBU elements to a low-overhead temporal unit.

RTP carries OBUs without their size fields, packed as elements behind a one-byte aggregation
header, and may cut one OBU across packets. Decoders and containers want the "Low overhead
bitstream format" instead: a temporal delimiter, then every OBU with obu_has_size_field set.
Temporal delimiters and tile lists that come over RTP are dropped, as the payload spec asks.
The latest sequence header becomes an AV1CodecConfigurationRecord ('av1C') for extradata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from melter.depay.base import VideoDepacketizer, VideoFrame, check_payloads
from melter.depay.bitreader import BitReader

OBU_SEQUENCE_HEADER = 1
OBU_TEMPORAL_DELIMITER = 2
OBU_FRAME_HEADER = 3
OBU_TILE_GROUP = 4
OBU_METADATA = 5
OBU_FRAME = 6
OBU_REDUNDANT_FRAME_HEADER = 7
OBU_TILE_LIST = 8
OBU_PADDING = 15
KEY_FRAME = 0
#: A temporal delimiter OBU with a zero size field: the start of every temporal unit.
TEMPORAL_DELIMITER = b"\x12\x00"
_DROPPED_TYPES = {OBU_TEMPORAL_DELIMITER, OBU_TILE_LIST}
_MAX_LEB128_BYTES = 8


def read_leb128(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """``(value, position after it)``; ``what`` names the field in the error when it is cut."""
    value = 0
    for index in range(_MAX_LEB128_BYTES):
        if pos + index >= len(data):
            raise ValueError(f"{what} is cut")
        byte = data[pos + index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            if value > 0xFFFFFFFF:
                raise ValueError(f"{what} is larger than 2^32 - 1")
            return value, pos + index + 1
    raise ValueError(f"{what} is longer than 8 bytes")


def leb128(value: int) -> bytes:
    """Shortest LEB128 coding of ``value``."""
    if value < 0:
        raise ValueError("LEB128 value must not be negative")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@dataclass(frozen=True, slots=True)
class Av1AggregationHeader:
    """The first byte of every AV1 RTP payload: ``Z Y W W N - - -``.

    ``first_continues`` (Z): the first element continues the previous packet's last OBU.
    ``last_continues`` (Y): the last element goes on in the next packet.
    ``element_count`` (W): 0 means every element has a length; 1..3 is the number of
    elements, the last without one. ``new_sequence`` (N): a coded video sequence starts here.
    """

    first_continues: bool = False
    last_continues: bool = False
    element_count: int = 0
    new_sequence: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.element_count <= 3:
            raise ValueError("AV1 W field must fit in 2 bits")

    @classmethod
    def parse(cls, data: bytes) -> tuple[Av1AggregationHeader, bytes]:
        if not data:
            raise ValueError("AV1 aggregation header is cut")
        byte = data[0]
        header = cls(
            first_continues=bool(byte & 0x80),
            last_continues=bool(byte & 0x40),
            element_count=(byte >> 4) & 0x03,
            new_sequence=bool(byte & 0x08),
        )
        return header, data[1:]

    def __bytes__(self) -> bytes:
        return bytes(
            (
                (0x80 if self.first_continues else 0)
                | (0x40 if self.last_continues else 0)
                | (self.element_count << 4)
                | (0x08 if self.new_sequence else 0),
            )
        )


@dataclass(frozen=True, slots=True)
class ObuHeader:
    """OBU header (AV1 spec §5.3.2) with its optional extension byte.

    ``temporal_id``/``spatial_id`` are ``None`` when there is no extension byte.
    """

    obu_type: int
    has_size_field: bool = False
    temporal_id: int | None = None
    spatial_id: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.obu_type <= 15:
            raise ValueError("AV1 OBU type must fit in 4 bits")
        if (self.temporal_id is None) != (self.spatial_id is None):
            raise ValueError("AV1 OBU extension needs both temporal and spatial id")
        if self.temporal_id is not None and not 0 <= self.temporal_id <= 7:
            raise ValueError("AV1 temporal id must fit in 3 bits")
        if self.spatial_id is not None and not 0 <= self.spatial_id <= 3:
            raise ValueError("AV1 spatial id must fit in 2 bits")

    @classmethod
    def parse(cls, data: bytes) -> tuple[ObuHeader, bytes]:
        if not data:
            raise ValueError("AV1 OBU header is cut")
        byte = data[0]
        if byte & 0x80:
            raise ValueError("AV1 OBU forbidden bit is set")
        temporal_id = spatial_id = None
        pos = 1
        if byte & 0x04:  # obu_extension_flag
            if len(data) < 2:
                raise ValueError("AV1 OBU extension header is cut")
            temporal_id, spatial_id = data[1] >> 5, (data[1] >> 3) & 0x03
            pos = 2
        header = cls((byte >> 3) & 0x0F, bool(byte & 0x02), temporal_id, spatial_id)
        return header, data[pos:]

    def __bytes__(self) -> bytes:
        byte = (self.obu_type << 3) | (0x02 if self.has_size_field else 0)
        if self.temporal_id is None or self.spatial_id is None:
            return bytes((byte,))
        return bytes((byte | 0x04, (self.temporal_id << 5) | (self.spatial_id << 3)))


def split_elements(payload: bytes) -> tuple[Av1AggregationHeader, list[bytes]]:
    """The aggregation header and the OBU elements (whole OBUs or fragments) of a payload."""
    header, body = Av1AggregationHeader.parse(payload)
    elements: list[bytes] = []
    pos = 0
    while pos < len(body):
        if header.element_count and len(elements) == header.element_count - 1:
            size = len(body) - pos
        else:
            size, pos = read_leb128(body, pos, "AV1 OBU element length")
            if pos + size > len(body):
                raise ValueError(f"AV1 OBU element of {size} bytes is cut")
        elements.append(body[pos : pos + size])
        pos += size
    if header.element_count and len(elements) != header.element_count:
        raise ValueError(
            f"AV1 packet has {len(elements)} OBU elements, W says {header.element_count}"
        )
    if not elements:
        raise ValueError("AV1 packet has no OBU elements")
    return header, elements


@dataclass(frozen=True, slots=True)
class Av1SequenceHeader:
    """The sequence header fields the av1C record and the stream's size need (AV1 §5.5)."""

    seq_profile: int
    still_picture: bool
    reduced_still_picture_header: bool
    seq_level_idx_0: int
    seq_tier_0: int
    initial_display_delay_minus_1_0: int | None
    max_frame_width: int
    max_frame_height: int
    high_bitdepth: bool
    twelve_bit: bool
    mono_chrome: bool
    subsampling_x: int
    subsampling_y: int
    chroma_sample_position: int

    @classmethod
    def parse(cls, payload: bytes) -> Av1SequenceHeader:
        """Parse the OBU payload (after header and size) of a sequence header OBU."""
        reader = BitReader(payload)
        try:
            return cls._parse(reader)
        except ValueError:
            raise ValueError("AV1 sequence header is cut") from None

    @classmethod
    def _parse(cls, reader: BitReader) -> Av1SequenceHeader:
        seq_profile = reader.bits(3)
        still_picture = bool(reader.bit())
        reduced = bool(reader.bit())
        seq_tier_0 = 0
        display_delay_0 = None
        if reduced:
            seq_level_idx_0 = reader.bits(5)
        else:
            decoder_model_info = False
            buffer_delay_length = 0
            if reader.bit():  # timing_info_present_flag
                reader.skip(64)  # num_units_in_display_tick, time_scale
                if reader.bit():  # equal_picture_interval
                    _skip_uvlc(reader)
                decoder_model_info = bool(reader.bit())
                if decoder_model_info:
                    buffer_delay_length = reader.bits(5) + 1
                    reader.skip(32 + 5 + 5)
            display_delay_present = reader.bit()
            operating_points = reader.bits(5) + 1
            seq_level_idx_0 = 0
            for index in range(operating_points):
                reader.skip(12)  # operating_point_idc
                level = reader.bits(5)
                tier = reader.bit() if level > 7 else 0
                if decoder_model_info and reader.bit():
                    reader.skip(2 * buffer_delay_length + 1)
                delay = None
                if display_delay_present and reader.bit():
                    delay = reader.bits(4)
                if index == 0:
                    seq_level_idx_0, seq_tier_0, display_delay_0 = level, tier, delay
        width_bits = reader.bits(4) + 1
        height_bits = reader.bits(4) + 1
        max_width = reader.bits(width_bits) + 1
        max_height = reader.bits(height_bits) + 1
        if not reduced and reader.bit():  # frame_id_numbers_present_flag
            reader.skip(4 + 3)
        reader.skip(3)  # use_128x128_superblock, enable_filter_intra, enable_intra_edge_filter
        if not reduced:
            reader.skip(4)  # interintra, masked compound, warped motion, dual filter
            order_hint = reader.bit()
            if order_hint:
                reader.skip(2)  # enable_jnt_comp, enable_ref_frame_mvs
            force_screen_content = 2 if reader.bit() else reader.bit()
            if force_screen_content > 0 and not reader.bit():  # seq_choose_integer_mv
                reader.skip(1)  # seq_force_integer_mv
            if order_hint:
                reader.skip(3)  # order_hint_bits_minus_1
        reader.skip(3)  # enable_superres, enable_cdef, enable_restoration
        # color_config (§5.5.2)
        high_bitdepth = bool(reader.bit())
        twelve_bit = bool(reader.bit()) if seq_profile == 2 and high_bitdepth else False
        mono_chrome = False if seq_profile == 1 else bool(reader.bit())
        primaries = transfer = matrix = 2  # unspecified
        if reader.bit():  # color_description_present_flag
            primaries, transfer, matrix = reader.bits(8), reader.bits(8), reader.bits(8)
        chroma_sample_position = 0
        if mono_chrome:
            subsampling_x = subsampling_y = 1
        elif primaries == 1 and transfer == 13 and matrix == 0:  # sRGB: 4:4:4
            subsampling_x = subsampling_y = 0
        else:
            reader.skip(1)  # color_range
            if seq_profile == 0:
                subsampling_x = subsampling_y = 1
            elif seq_profile == 1:
                subsampling_x = subsampling_y = 0
            elif twelve_bit:
                subsampling_x = reader.bit()
                subsampling_y = reader.bit() if subsampling_x else 0
            else:
                subsampling_x, subsampling_y = 1, 0
            if subsampling_x and subsampling_y:
                chroma_sample_position = reader.bits(2)
        return cls(
            seq_profile=seq_profile,
            still_picture=still_picture,
            reduced_still_picture_header=reduced,
            seq_level_idx_0=seq_level_idx_0,
            seq_tier_0=seq_tier_0,
            initial_display_delay_minus_1_0=display_delay_0,
            max_frame_width=max_width,
            max_frame_height=max_height,
            high_bitdepth=high_bitdepth,
            twelve_bit=twelve_bit,
            mono_chrome=mono_chrome,
            subsampling_x=subsampling_x,
            subsampling_y=subsampling_y,
            chroma_sample_position=chroma_sample_position,
        )

    def codec_configuration(self, sequence_header_obu: bytes) -> bytes:
        """The av1C record (AV1-ISOBMFF §2.3) carrying ``sequence_header_obu`` (sized OBU)."""
        return (
            bytes(
                (
                    0x81,  # marker, version 1
                    (self.seq_profile << 5) | self.seq_level_idx_0,
                    (self.seq_tier_0 << 7)
                    | (self.high_bitdepth << 6)
                    | (self.twelve_bit << 5)
                    | (self.mono_chrome << 4)
                    | (self.subsampling_x << 3)
                    | (self.subsampling_y << 2)
                    | self.chroma_sample_position,
                    0,  # no initial_presentation_delay: it counts samples, not frames
                )
            )
            + sequence_header_obu
        )


def _skip_uvlc(reader: BitReader) -> None:
    """uvlc() (AV1 §4.10.3): 32 or more leading zeros mean "no value bits follow"."""
    zeros = 0
    while not reader.bit():
        zeros += 1
    if zeros < 32:
        reader.skip(zeros)


def _is_key_frame_header(payload: bytes, sequence: Av1SequenceHeader | None) -> bool:
    """Whether a frame header (or frame) OBU payload starts a KEY_FRAME (AV1 §5.9.2)."""
    if sequence is not None and sequence.reduced_still_picture_header:
        return True
    if not payload:
        return False
    show_existing_frame = payload[0] >> 7
    return not show_existing_frame and (payload[0] >> 5) & 0x03 == KEY_FRAME


class Av1Depacketizer(VideoDepacketizer):
    codec_name = "av1"

    def __init__(self) -> None:
        self.sequence_header: Av1SequenceHeader | None = None
        #: The latest sequence header as a sized OBU, the av1C's configOBUs.
        self.sequence_header_obu: bytes | None = None

    @staticmethod
    def _obus(payloads: Sequence[bytes]) -> list[bytes]:
        """Whole OBUs (as sent: usually without size field) joined across packets."""
        obus: list[bytes] = []
        pending: bytearray | None = None
        for payload in payloads:
            header, elements = split_elements(payload)
            start = 0
            if header.first_continues:
                if pending is None:
                    raise ValueError("AV1 packet continues an OBU that never started (Z bit)")
                pending += elements[0]
                if len(elements) == 1 and header.last_continues:
                    continue
                obus.append(bytes(pending))
                pending = None
                start = 1
            elif pending is not None:
                raise ValueError("AV1 OBU fragment without its continuation (Y bit)")
            for index in range(start, len(elements)):
                if index == len(elements) - 1 and header.last_continues:
                    pending = bytearray(elements[index])
                else:
                    obus.append(elements[index])
        if pending is not None:
            raise ValueError("AV1 OBU continues past the picture's last packet (Y bit)")
        return obus

    def assemble(self, payloads: Sequence[bytes]) -> VideoFrame:
        check_payloads(payloads)
        first, _ = Av1AggregationHeader.parse(payloads[0])
        obus = self._obus(payloads)
        out = bytearray(TEMPORAL_DELIMITER)
        sequence: Av1SequenceHeader | None = None
        key_frame_header = False
        seen_frame_header = False
        for obu in obus:
            header, rest = ObuHeader.parse(obu)
            if header.has_size_field:
                size, pos = read_leb128(rest, 0, "AV1 OBU size field")
                if size > len(rest) - pos:
                    raise ValueError(f"AV1 OBU of {size} bytes is cut")
                payload = rest[pos : pos + size]
            else:
                payload = rest
            if header.obu_type in _DROPPED_TYPES:
                continue
            sized = (
                bytes(ObuHeader(header.obu_type, True, header.temporal_id, header.spatial_id))
                + leb128(len(payload))
                + payload
            )
            out += sized
            if header.obu_type == OBU_SEQUENCE_HEADER:
                try:
                    sequence = Av1SequenceHeader.parse(payload)
                except ValueError:
                    continue
                self.sequence_header = sequence
                self.sequence_header_obu = sized
            elif header.obu_type in (OBU_FRAME, OBU_FRAME_HEADER) and not seen_frame_header:
                seen_frame_header = True
                key_frame_header = _is_key_frame_header(payload, self.sequence_header)
        keyframe = first.new_sequence or (sequence is not None and key_frame_header)
        width = height = None
        if sequence is not None:
            width, height = sequence.max_frame_width, sequence.max_frame_height
        return VideoFrame(bytes(out), keyframe, width, height)

    def extradata(self) -> bytes | None:
        if self.sequence_header is None or self.sequence_header_obu is None:
            return None
        return self.sequence_header.codec_configuration(self.sequence_header_obu)
