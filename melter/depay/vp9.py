"""VP9 (RFC 9628): strip the payload descriptor, join the layer frames of one picture.

A picture is every packet of one RTP timestamp. Without spatial scalability it holds one layer
frame, which is already what a decoder wants. With spatial SVC it holds one layer frame per
spatial layer (the B and E bits mark where each begins and ends); decoders take those as one
VP9 superframe (VP9 bitstream spec, Annex B), so the layer frames are joined and the superframe
index is appended. A layer frame that is itself a superframe (a hidden alt-ref frame sent
together with the frame showing it) is unpacked first, because superframes do not nest.

Encoders mark every spatial layer frame as shown; libvpx's decoder then shows only the last
frame of a superframe, FFmpeg's shows each. So the lower layers' headers are rewritten as
hidden frames (see :func:`hide_frame`), and a picture decodes to one frame at the top size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from melter.depay.base import VideoDepacketizer, VideoFrame, check_payloads
from melter.depay.bitreader import BitReader

#: The superframe index can list at most 8 frames (3-bit count).
MAX_SUPERFRAME_FRAMES = 8
_SYNC_CODE = 0x498342
_CS_RGB = 7


@dataclass(frozen=True, slots=True)
class Vp9PictureGroupEntry:
    """One picture of the SS picture group: its temporal layer and references."""

    tid: int
    switching_up: bool = False
    p_diffs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.tid <= 7:
            raise ValueError("VP9 SS picture group TID must fit in 3 bits")
        if len(self.p_diffs) > 3:
            raise ValueError("VP9 SS picture group has more than 3 P_DIFFs")
        if any(not 0 <= diff <= 0xFF for diff in self.p_diffs):
            raise ValueError("VP9 SS picture group P_DIFF must fit in 8 bits")


@dataclass(frozen=True, slots=True)
class Vp9ScalabilityStructure:
    """The SS block: how many spatial layers, their sizes and the picture group.

    ``resolutions`` is ``None`` when the Y bit is clear; ``picture_group`` is ``None`` when
    the G bit is clear (an empty tuple is a present but empty group, N_G = 0).
    """

    spatial_layers: int
    resolutions: tuple[tuple[int, int], ...] | None = None
    picture_group: tuple[Vp9PictureGroupEntry, ...] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.spatial_layers <= 8:
            raise ValueError("VP9 SS spatial layer count must be 1..8")
        if self.resolutions is not None:
            if len(self.resolutions) != self.spatial_layers:
                raise ValueError("VP9 SS needs one resolution per spatial layer")
            for width, height in self.resolutions:
                if not (0 <= width <= 0xFFFF and 0 <= height <= 0xFFFF):
                    raise ValueError("VP9 SS resolution must fit in 16 bits")
        if self.picture_group is not None and len(self.picture_group) > 0xFF:
            raise ValueError("VP9 SS picture group has more than 255 pictures")

    @classmethod
    def parse(cls, data: bytes) -> tuple[Vp9ScalabilityStructure, bytes]:
        if not data:
            raise ValueError("VP9 scalability structure is cut")
        first = data[0]
        spatial_layers = (first >> 5) + 1
        pos = 1
        resolutions = None
        if first & 0x10:  # Y
            end = pos + 4 * spatial_layers
            if len(data) < end:
                raise ValueError("VP9 SS resolution is cut")
            resolutions = tuple(
                (
                    int.from_bytes(data[at : at + 2], "big"),
                    int.from_bytes(data[at + 2 : at + 4], "big"),
                )
                for at in range(pos, end, 4)
            )
            pos = end
        picture_group = None
        if first & 0x08:  # G
            if len(data) < pos + 1:
                raise ValueError("VP9 SS picture group size (N_G) is cut")
            count = data[pos]
            pos += 1
            entries = []
            for _ in range(count):
                if len(data) < pos + 1:
                    raise ValueError("VP9 SS picture group entry is cut")
                byte = data[pos]
                references = (byte >> 2) & 0x03
                if len(data) < pos + 1 + references:
                    raise ValueError("VP9 SS picture group P_DIFF is cut")
                entries.append(
                    Vp9PictureGroupEntry(
                        tid=byte >> 5,
                        switching_up=bool(byte & 0x10),
                        p_diffs=tuple(data[pos + 1 : pos + 1 + references]),
                    )
                )
                pos += 1 + references
            picture_group = tuple(entries)
        return cls(spatial_layers, resolutions, picture_group), data[pos:]

    def __bytes__(self) -> bytes:
        first = (self.spatial_layers - 1) << 5
        out = bytearray()
        if self.resolutions is not None:
            first |= 0x10
            for width, height in self.resolutions:
                out += width.to_bytes(2, "big") + height.to_bytes(2, "big")
        if self.picture_group is not None:
            first |= 0x08
            out.append(len(self.picture_group))
            for entry in self.picture_group:
                out.append(
                    (entry.tid << 5)
                    | (0x10 if entry.switching_up else 0)
                    | (len(entry.p_diffs) << 2)
                )
                out += bytes(entry.p_diffs)
        return bytes((first,)) + bytes(out)

    def largest_resolution(self) -> tuple[int, int] | None:
        """The biggest layer's size: that is the picture a full decode shows."""
        if not self.resolutions:
            return None
        return max(self.resolutions, key=lambda size: size[0] * size[1])


@dataclass(frozen=True, slots=True)
class Vp9Descriptor:
    """The RFC 9628 payload descriptor in front of every VP9 RTP payload.

    The layer indices (L bit) are present when ``tid``/``sid`` are set; TL0PICIDX comes with
    them in non-flexible mode only, and the P_DIFFs only in flexible mode on inter pictures.
    ``long_picture_id`` keeps the M bit, so a small picture id sent in 15 bits round-trips.
    """

    start_of_frame: bool
    end_of_frame: bool
    inter_picture: bool = False
    flexible: bool = False
    not_upper_reference: bool = False
    picture_id: int | None = None
    long_picture_id: bool = True
    tid: int | None = None
    sid: int | None = None
    switching_up: bool = False
    inter_layer: bool = False
    tl0_pic_idx: int | None = None
    p_diffs: tuple[int, ...] = ()
    ss: Vp9ScalabilityStructure | None = None

    def __post_init__(self) -> None:
        if self.picture_id is not None:
            limit = 0x7FFF if self.long_picture_id else 0x7F
            if not 0 <= self.picture_id <= limit:
                raise ValueError(f"VP9 picture id {self.picture_id} does not fit")
        if (self.tid is None) != (self.sid is None):
            raise ValueError("VP9 layer indices need both TID and SID")
        if self.tid is not None and not 0 <= self.tid <= 7:
            raise ValueError("VP9 TID must fit in 3 bits")
        if self.sid is not None and not 0 <= self.sid <= 7:
            raise ValueError("VP9 SID must fit in 3 bits")
        wants_tl0 = self.tid is not None and not self.flexible
        if wants_tl0 != (self.tl0_pic_idx is not None):
            raise ValueError("VP9 TL0PICIDX goes with layer indices in non-flexible mode only")
        if self.tl0_pic_idx is not None and not 0 <= self.tl0_pic_idx <= 0xFF:
            raise ValueError("VP9 TL0PICIDX must fit in 8 bits")
        wants_diffs = self.flexible and self.inter_picture
        if wants_diffs != bool(self.p_diffs):
            raise ValueError("VP9 P_DIFFs go with inter pictures in flexible mode only")
        if len(self.p_diffs) > 3 or any(not 0 <= diff <= 0x7F for diff in self.p_diffs):
            raise ValueError("VP9 P_DIFFs: at most 3 of 7 bits each")

    @classmethod
    def parse(cls, data: bytes) -> tuple[Vp9Descriptor, bytes]:
        if not data:
            raise ValueError("VP9 payload descriptor is cut")
        first = data[0]
        pos = 1
        flexible = bool(first & 0x10)
        inter_picture = bool(first & 0x40)
        picture_id = None
        long_picture_id = True
        if first & 0x80:  # I
            if len(data) < pos + 1:
                raise ValueError("VP9 picture id is cut")
            long_picture_id = bool(data[pos] & 0x80)
            if long_picture_id:
                if len(data) < pos + 2:
                    raise ValueError("VP9 picture id is cut")
                picture_id = ((data[pos] & 0x7F) << 8) | data[pos + 1]
                pos += 2
            else:
                picture_id = data[pos]
                pos += 1
        tid = sid = tl0 = None
        switching_up = inter_layer = False
        if first & 0x20:  # L
            if len(data) < pos + 1:
                raise ValueError("VP9 layer indices are cut")
            layers = data[pos]
            tid, switching_up, sid, inter_layer = (
                layers >> 5,
                bool(layers & 0x10),
                (layers >> 1) & 0x07,
                bool(layers & 0x01),
            )
            pos += 1
            if not flexible:
                if len(data) < pos + 1:
                    raise ValueError("VP9 TL0PICIDX is cut")
                tl0 = data[pos]
                pos += 1
        p_diffs: list[int] = []
        if flexible and inter_picture:
            while True:
                if len(p_diffs) == 3:
                    raise ValueError("VP9 P_DIFF list is longer than 3")
                if len(data) < pos + 1:
                    raise ValueError("VP9 P_DIFF is cut")
                p_diffs.append(data[pos] >> 1)
                more = data[pos] & 0x01
                pos += 1
                if not more:
                    break
        rest = data[pos:]
        ss = None
        if first & 0x02:  # V
            ss, rest = Vp9ScalabilityStructure.parse(rest)
        descriptor = cls(
            start_of_frame=bool(first & 0x08),
            end_of_frame=bool(first & 0x04),
            inter_picture=inter_picture,
            flexible=flexible,
            not_upper_reference=bool(first & 0x01),
            picture_id=picture_id,
            long_picture_id=long_picture_id,
            tid=tid,
            sid=sid,
            switching_up=switching_up,
            inter_layer=inter_layer,
            tl0_pic_idx=tl0,
            p_diffs=tuple(p_diffs),
            ss=ss,
        )
        return descriptor, rest

    def __bytes__(self) -> bytes:
        first = (
            (0x40 if self.inter_picture else 0)
            | (0x10 if self.flexible else 0)
            | (0x08 if self.start_of_frame else 0)
            | (0x04 if self.end_of_frame else 0)
            | (0x01 if self.not_upper_reference else 0)
        )
        out = bytearray()
        if self.picture_id is not None:
            first |= 0x80
            if self.long_picture_id:
                out += bytes((0x80 | (self.picture_id >> 8), self.picture_id & 0xFF))
            else:
                out.append(self.picture_id)
        if self.tid is not None and self.sid is not None:
            first |= 0x20
            out.append(
                (self.tid << 5)
                | (0x10 if self.switching_up else 0)
                | (self.sid << 1)
                | (0x01 if self.inter_layer else 0)
            )
            if self.tl0_pic_idx is not None:
                out.append(self.tl0_pic_idx)
        for index, diff in enumerate(self.p_diffs):
            out.append((diff << 1) | (1 if index + 1 < len(self.p_diffs) else 0))
        if self.ss is not None:
            first |= 0x02
            out += bytes(self.ss)
        return bytes((first,)) + bytes(out)


#: Sizes of the 8 VP9 reference slots (``None``: not known yet).
RefSizes = Sequence[tuple[int, int] | None]


@dataclass(frozen=True, slots=True)
class Vp9FrameHeader:
    """The parts of a VP9 uncompressed header (spec §6.2) the depacketizer acts on.

    ``width``/``height`` are ``None`` when the frame copies its size from a reference whose
    size is not known; ``explicit_size`` says whether the size was coded in this header.
    ``flags_end`` is the bit position right after error_resilient_mode, where intra_only goes
    when a frame is hidden; ``header_bits`` the length of the whole uncompressed header
    without its trailing bits, ``None`` when it could not be parsed that far.
    """

    profile: int
    show_existing_frame: bool
    key_frame: bool = False
    show_frame: bool = True
    intra_only: bool = False
    refresh_frame_flags: int = 0
    width: int | None = None
    height: int | None = None
    explicit_size: bool = False
    flags_end: int = 0
    header_bits: int | None = None

    @property
    def size(self) -> tuple[int, int] | None:
        if self.width is None or self.height is None:
            return None
        return self.width, self.height


@dataclass(frozen=True, slots=True)
class Vp9FrameInfo:
    """What the uncompressed header of one VP9 frame says about the picture."""

    key_frame: bool
    show_frame: bool
    width: int | None = None
    height: int | None = None


def _skip_color_config(reader: BitReader, profile: int) -> None:
    if profile >= 2:
        reader.skip(1)  # ten_or_twelve_bit
    color_space = reader.bits(3)
    if color_space != _CS_RGB:
        reader.skip(1)  # color_range
        if profile in (1, 3):
            reader.skip(3)  # subsampling_x, subsampling_y, reserved_zero
    elif profile in (1, 3):
        reader.skip(1)  # reserved_zero


def _frame_size(reader: BitReader) -> tuple[int, int]:
    return reader.bits(16) + 1, reader.bits(16) + 1


def _skip_render_size(reader: BitReader) -> None:
    if reader.bit():  # render_and_frame_size_different
        reader.skip(32)


def _skip_probability(reader: BitReader) -> None:
    if reader.bit():  # prob_coded
        reader.skip(8)


def _skip_header_tail(reader: BitReader, error_resilient: bool, width: int) -> None:
    """From refresh_frame_context to header_size_in_bytes (spec §6.2, §6.2.8-§6.2.14)."""
    if not error_resilient:
        reader.skip(2)  # refresh_frame_context, frame_parallel_decoding_mode
    reader.skip(2)  # frame_context_idx
    # loop_filter_params
    reader.skip(6 + 3)  # loop_filter_level, loop_filter_sharpness
    if reader.bit() and reader.bit():  # loop_filter_delta_enabled, loop_filter_delta_update
        for _ in range(4 + 2):  # ref deltas, mode deltas: su(6) each when updated
            if reader.bit():
                reader.skip(7)
    # quantization_params
    reader.skip(8)  # base_q_idx
    for _ in range(3):  # delta_q_y_dc, delta_q_uv_dc, delta_q_uv_ac
        if reader.bit():
            reader.skip(5)  # su(4)
    # segmentation_params
    if reader.bit():  # segmentation_enabled
        if reader.bit():  # segmentation_update_map
            for _ in range(7):
                _skip_probability(reader)
            if reader.bit():  # segmentation_temporal_update
                for _ in range(3):
                    _skip_probability(reader)
        if reader.bit():  # segmentation_update_data
            reader.skip(1)  # segmentation_abs_or_delta_update
            for _ in range(8):  # segments
                for value_bits in (8 + 1, 6 + 1, 2, 0):  # feature bits (+ sign)
                    if reader.bit():
                        reader.skip(value_bits)
    # tile_info: how many increment bits there are depends on the frame width
    sb64_cols = (((width + 7) >> 3) + 7) >> 3
    min_log2 = 0
    while (64 << min_log2) < sb64_cols:
        min_log2 += 1
    max_log2 = 1
    while (sb64_cols >> max_log2) >= 4:
        max_log2 += 1
    max_log2 -= 1
    tile_cols_log2 = min_log2
    while tile_cols_log2 < max_log2 and reader.bit():
        tile_cols_log2 += 1
    if reader.bit():  # tile_rows_log2
        reader.skip(1)
    reader.skip(16)  # header_size_in_bytes


def parse_frame_header(frame: bytes, ref_sizes: RefSizes | None = None) -> Vp9FrameHeader | None:
    """Parse a VP9 uncompressed header; ``None`` when the bytes are not a VP9 frame.

    ``ref_sizes`` (the 8 reference slots' sizes, as the depacketizer tracks them) lets a frame
    that copies its size from a reference be parsed to the end: the tile info's length
    depends on the width.
    """
    reader = BitReader(frame)
    try:
        if reader.bits(2) != 2:  # frame_marker
            return None
        profile = reader.bit()
        profile |= reader.bit() << 1
        if profile == 3:
            reader.skip(1)
        if reader.bit():
            return Vp9FrameHeader(profile, show_existing_frame=True)
        key_frame = reader.bit() == 0
        show_frame = bool(reader.bit())
        error_resilient = bool(reader.bit())
        flags_end = reader.pos
        intra_only = False
        size: tuple[int, int] | None = None
        explicit = True
        if key_frame:
            if reader.bits(24) != _SYNC_CODE:
                return None
            _skip_color_config(reader, profile)
            size = _frame_size(reader)
            refresh = 0xFF
            _skip_render_size(reader)
        else:
            intra_only = not show_frame and bool(reader.bit())
            if not error_resilient:
                reader.skip(2)  # reset_frame_context
            if intra_only:
                if reader.bits(24) != _SYNC_CODE:
                    return None
                if profile > 0:
                    _skip_color_config(reader, profile)
                refresh = reader.bits(8)
                size = _frame_size(reader)
                _skip_render_size(reader)
            else:
                refresh = reader.bits(8)
                ref_slots = []
                for _ in range(3):
                    ref_slots.append(reader.bits(3))
                    reader.skip(1)  # ref_frame_sign_bias
                for slot in ref_slots:
                    if reader.bit():  # found_ref: the size of that reference
                        explicit = False
                        size = ref_sizes[slot] if ref_sizes is not None else None
                        break
                else:
                    size = _frame_size(reader)
                _skip_render_size(reader)
                reader.skip(1)  # allow_high_precision_mv
                if not reader.bit():  # is_filter_switchable
                    reader.skip(2)  # raw_interpolation_filter
    except ValueError:
        return None
    header = Vp9FrameHeader(
        profile=profile,
        show_existing_frame=False,
        key_frame=key_frame,
        show_frame=show_frame,
        intra_only=intra_only,
        refresh_frame_flags=refresh,
        width=size[0] if size else None,
        height=size[1] if size else None,
        explicit_size=explicit,
        flags_end=flags_end,
    )
    if size is None:
        return header
    try:
        _skip_header_tail(reader, error_resilient, size[0])
    except ValueError:
        return header
    return replace(header, header_bits=reader.pos)


def frame_info(frame: bytes) -> Vp9FrameInfo | None:
    """Key/show flags and the coded size of one frame, without any stream state.

    ``None`` when the bytes are not a VP9 frame; width/height are ``None`` when the frame
    takes its size from a reference (only a decoder with state knows it).
    """
    header = parse_frame_header(frame)
    if header is None:
        return None
    if not header.explicit_size:
        return Vp9FrameInfo(header.key_frame, header.show_frame)
    return Vp9FrameInfo(header.key_frame, header.show_frame, header.width, header.height)


def hide_frame(frame: bytes, header: Vp9FrameHeader) -> bytes | None:
    """The frame with show_frame = 0, decoding to the same picture; ``None`` if not possible.

    A key frame only needs its show_frame bit cleared. An inter frame also gains an
    intra_only = 0 bit (coded only when show_frame is 0), so the rest of its uncompressed
    header shifts by one bit and is re-padded; the compressed header and the tiles after it
    are byte-aligned and stay as they are.
    """
    if header.show_existing_frame or not header.show_frame:
        return None
    show_bit = 7 if header.profile == 3 else 6
    if header.key_frame:
        out = bytearray(frame)
        out[0] &= ~(0x80 >> show_bit) & 0xFF
        return bytes(out)
    if header.intra_only or header.header_bits is None:
        return None
    length = header.header_bits
    header_bytes = (length + 7) // 8
    bits = f"{int.from_bytes(frame[:header_bytes], 'big'):0{header_bytes * 8}b}"[:length]
    flags_end = header.flags_end
    rewritten = bits[:show_bit] + "0" + bits[show_bit + 1 : flags_end] + "0" + bits[flags_end:]
    rewritten += "0" * (-len(rewritten) % 8)  # trailing_bits
    return int(rewritten, 2).to_bytes(len(rewritten) // 8, "big") + frame[header_bytes:]


def split_superframe(data: bytes) -> list[bytes]:
    """The frames of a superframe (Annex B), or ``[data]`` when it has no superframe index."""
    if not data:
        return [data]
    marker = data[-1]
    if marker & 0xE0 != 0xC0:
        return [data]
    count = (marker & 0x07) + 1
    size_bytes = ((marker >> 3) & 0x03) + 1
    index_size = 2 + size_bytes * count
    if len(data) < index_size or data[-index_size] != marker:
        return [data]
    index = data[len(data) - index_size + 1 : -1]
    sizes = [
        int.from_bytes(index[at : at + size_bytes], "little")
        for at in range(0, len(index), size_bytes)
    ]
    if sum(sizes) > len(data) - index_size:
        raise ValueError("VP9 superframe index sizes exceed the superframe")
    frames = []
    pos = 0
    for size in sizes:
        if size:  # a zero-size entry carries no frame; decoders skip it too
            frames.append(data[pos : pos + size])
        pos += size
    return frames


def build_superframe(frames: Sequence[bytes]) -> bytes:
    """Join frames into one superframe: the frames, then the index (Annex B)."""
    if not 1 <= len(frames) <= MAX_SUPERFRAME_FRAMES:
        raise ValueError(f"VP9 superframe cannot hold {len(frames)} frames")
    largest = max(len(frame) for frame in frames)
    size_bytes = max(1, (largest.bit_length() + 7) // 8)
    if size_bytes > 4:
        raise ValueError("VP9 superframe frame is too large for the index")
    marker = 0xC0 | ((size_bytes - 1) << 3) | (len(frames) - 1)
    sizes = b"".join(len(frame).to_bytes(size_bytes, "little") for frame in frames)
    return b"".join(frames) + bytes((marker,)) + sizes + bytes((marker,))


class Vp9Depacketizer(VideoDepacketizer):
    """Joins layer frames into superframes and shows only the top layer of each picture.

    libvpx codes every spatial layer with show_frame = 1: its own decoder shows only the last
    frame of a superframe, but FFmpeg's shows them all, so a 3-layer stream would play each
    picture three times at three sizes. Lower layers are therefore rewritten as hidden frames
    (they still update the references the upper layers predict from). That needs the frame
    size of every frame, so the sizes of the 8 reference slots are followed across pictures.
    """

    codec_name = "vp9"

    def __init__(self) -> None:
        self.ref_sizes: list[tuple[int, int] | None] = [None] * 8

    def _follow_references(self, header: Vp9FrameHeader | None) -> None:
        if header is None:  # cannot tell which slots changed: forget them all
            self.ref_sizes = [None] * 8
        elif not header.show_existing_frame:
            for slot in range(8):
                if header.refresh_frame_flags >> slot & 1:
                    self.ref_sizes[slot] = header.size

    def assemble(self, payloads: Sequence[bytes]) -> VideoFrame:
        check_payloads(payloads)
        first, _ = Vp9Descriptor.parse(payloads[0])
        layer_frames: list[bytes] = []
        current: bytearray | None = None
        ss: Vp9ScalabilityStructure | None = None
        for payload in payloads:
            descriptor, rest = Vp9Descriptor.parse(payload)
            if descriptor.ss is not None and ss is None:
                ss = descriptor.ss
            if descriptor.start_of_frame:
                if current is not None:
                    raise ValueError("VP9 layer frame without its end (E bit)")
                current = bytearray(rest)
            elif current is None:
                raise ValueError("VP9 layer frame without its beginning (B bit)")
            else:
                current += rest
            if descriptor.end_of_frame:
                if not current:
                    raise ValueError("VP9 layer frame is empty")
                layer_frames.append(bytes(current))
                current = None
        if current is not None:
            raise ValueError("VP9 layer frame without its end (E bit)")
        frames = [part for layer in layer_frames for part in split_superframe(layer)]
        headers = []
        for frame in frames:
            header = parse_frame_header(frame, self.ref_sizes)
            headers.append(header)
            self._follow_references(header)
        if len(layer_frames) == 1:
            data = layer_frames[0]
        else:
            data = build_superframe(self._hide_lower_layers(frames, headers))
        base = headers[0]
        base_layer = first.sid in (None, 0)
        if base is not None:
            keyframe = base_layer and base.key_frame
        else:  # not a parsable header: trust the descriptor's P bit
            keyframe = base_layer and not first.inter_picture
        size = ss.largest_resolution() if ss is not None else None
        top = headers[-1]
        if size is None and top is not None and top.explicit_size:
            size = top.size  # the last frame is the top spatial layer, the largest picture
        width, height = size if size is not None else (None, None)
        return VideoFrame(data, keyframe, width, height)

    @staticmethod
    def _hide_lower_layers(
        frames: list[bytes], headers: Sequence[Vp9FrameHeader | None]
    ) -> list[bytes]:
        """Hide every shown frame but the last, where that leaves the decoding unchanged.

        Hiding matters to the next frame in one way only: it may use the previous frame's
        motion vectors if that frame was shown and has its size. Spatial layers differ in
        size, so a frame is hidden only when the next one is known to have another size.
        """
        out = list(frames)
        for index in range(len(frames) - 1):
            header, following = headers[index], headers[index + 1]
            if header is None or following is None:
                continue
            if header.size is None or following.size is None or header.size == following.size:
                continue
            hidden = hide_frame(frames[index], header)
            if hidden is not None:
                out[index] = hidden
        return out

    def starts_picture(self, payload: bytes) -> bool | None:
        descriptor, _ = Vp9Descriptor.parse(payload)
        return descriptor.start_of_frame and descriptor.sid in (None, 0)
