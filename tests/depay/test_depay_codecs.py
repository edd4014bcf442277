"""VP9, H.265 and AV1 depacketizers, end to end and on malformed input.

The end-to-end tests play both sides: a real encoder (through PyAV) makes a short clip, the
test packetizers cut it into RTP payloads the way a WebRTC sender would, the depacketizer
under test rebuilds the bitstream, and a real decoder must show every frame at the right size
and colour. That catches what byte-level tests cannot: a bitstream the decoder refuses.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, cast

import av
import numpy as np
import pytest
from av.video.codeccontext import VideoCodecContext
from hypothesis import given, settings
from hypothesis import strategies as st

from melter.depay.av1 import (
    OBU_SEQUENCE_HEADER,
    Av1AggregationHeader,
    Av1Depacketizer,
    Av1SequenceHeader,
    ObuHeader,
    leb128,
    read_leb128,
)
from melter.depay.base import VideoDepacketizer, VideoFrame
from melter.depay.h265 import H265Depacketizer, H265FuHeader, H265NalHeader, sps_dimensions
from melter.depay.opus import (
    PRE_SKIP,
    SHORTEST_SILENCE,
    MultiopusDepacketizer,
    OpusDepacketizer,
    packet_samples,
)
from melter.depay.vp9 import (
    Vp9Depacketizer,
    Vp9Descriptor,
    Vp9PictureGroupEntry,
    Vp9ScalabilityStructure,
    build_superframe,
    frame_info,
    hide_frame,
    parse_frame_header,
    split_superframe,
)
from tests.helpers.packetizers import (
    annexb_units,
    packetize_av1,
    packetize_h265,
    packetize_vp9,
    temporal_unit_obus,
)

# Not multiples of 8 or 16: encoders pad to whole blocks, so the size a depacketizer reports
# only comes out right if it honours cropping (H.265 conformance window) or the true size.
WIDTH, HEIGHT = 168, 100
FRAMES = 8
COLOUR = (90, 110, 160)  # Y, Cb, Cr
TOLERANCE = 4  # levels


def has_codec(name: str, mode: Literal["r", "w"]) -> bool:
    try:
        av.Codec(name, mode)
    except Exception:
        return False
    return True


def synthetic_clip(
    count: int, width: int = WIDTH, height: int = HEIGHT, noise: int = 24
) -> list[av.VideoFrame]:
    """A flat colour with luma noise: the noise keeps keyframes bigger than one packet (so
    fragmentation is exercised) while the mean colour stays known."""
    assert height % 4 == 0, "yuv420p from_ndarray packs chroma rows in pairs"
    rng = np.random.default_rng(7)
    frames = []
    for index in range(count):
        luma = COLOUR[0] + rng.integers(-noise, noise + 1, (height, width))
        chroma_rows = height // 4
        image = np.concatenate(
            [
                np.clip(luma, 0, 255),
                np.full((chroma_rows, width), COLOUR[1]),
                np.full((chroma_rows, width), COLOUR[2]),
            ]
        ).astype(np.uint8)
        frame = av.VideoFrame.from_ndarray(image, format="yuv420p")
        frame.pts = index
        frames.append(frame)
    return frames


@dataclass
class Encoded:
    data: bytes
    keyframe: bool


def encode(
    codec: str, frames: Sequence[av.VideoFrame], options: dict[str, str] | None = None
) -> list[Encoded]:
    context = cast(VideoCodecContext, av.CodecContext.create(codec, "w"))
    context.width = frames[0].width
    context.height = frames[0].height
    context.pix_fmt = "yuv420p"
    context.time_base = Fraction(1, 30)
    context.framerate = Fraction(30)
    context.options = options or {}
    packets = []
    for frame in frames:
        packets.extend(context.encode(frame))
    packets.extend(context.encode(None))
    return [Encoded(bytes(packet), packet.is_keyframe) for packet in packets]


def decode(
    codec: str, pictures: Sequence[bytes], extradata: bytes | None = None
) -> list[av.VideoFrame]:
    context = cast(VideoCodecContext, av.CodecContext.create(codec, "r"))
    if extradata is not None:
        context.extradata = extradata
    frames = []
    for picture in pictures:
        frames.extend(context.decode(av.Packet(picture)))
    frames.extend(context.decode(None))
    return frames


def plane_means(frame: av.VideoFrame) -> tuple[float, float, float]:
    image = frame.reformat(format="yuv420p").to_ndarray()
    height = frame.height
    quarter = height // 4
    return (
        float(image[:height].mean()),
        float(image[height : height + quarter].mean()),
        float(image[height + quarter :].mean()),
    )


def depacketize(
    depacketizer: VideoDepacketizer,
    encoded: Sequence[Encoded],
    packetize: Callable[[Encoded, int], list[bytes]],
) -> list[VideoFrame]:
    pictures = []
    for index, packet in enumerate(encoded):
        payloads = packetize(packet, index)
        assert all(len(payload) <= 1200 for payload in payloads)
        pictures.append(depacketizer.assemble(payloads))
    return pictures


def check_decoded(decoded: Sequence[av.VideoFrame], expected: int) -> None:
    assert len(decoded) == expected
    for frame in decoded:
        assert (frame.width, frame.height) == (WIDTH, HEIGHT)
        for got, want in zip(plane_means(frame), COLOUR, strict=True):
            assert abs(got - want) <= TOLERANCE


# --- VP9 ---------------------------------------------------------------------------------

needs_vp9 = pytest.mark.skipif(
    not (has_codec("libvpx-vp9", "w") and has_codec("vp9", "r")), reason="no VP9 codecs"
)


@needs_vp9
def test_vp9_clip_survives_packetization() -> None:
    encoded = encode("libvpx-vp9", synthetic_clip(FRAMES), {"deadline": "realtime"})
    assert len(encoded) == FRAMES
    assert len(encoded[0].data) > 2400  # the keyframe takes several packets
    ss = Vp9ScalabilityStructure(1, ((WIDTH, HEIGHT),))
    depacketizer = Vp9Depacketizer()
    pictures = depacketize(
        depacketizer,
        encoded,
        lambda packet, index: packetize_vp9(
            [packet.data], index, not packet.keyframe, ss if packet.keyframe else None
        ),
    )
    assert [picture.keyframe for picture in pictures] == [p.keyframe for p in encoded]
    assert pictures[0].keyframe
    assert (pictures[0].width, pictures[0].height) == (WIDTH, HEIGHT)
    assert [picture.data for picture in pictures] == [packet.data for packet in encoded]
    check_decoded(decode("vp9", [picture.data for picture in pictures]), FRAMES)


@needs_vp9
def test_vp9_size_comes_from_ss_first_then_keyframe_header() -> None:
    encoded = encode("libvpx-vp9", synthetic_clip(2), {"deadline": "realtime"})
    key, inter = encoded
    depacketizer = Vp9Depacketizer()
    bare = depacketizer.assemble(packetize_vp9([key.data], 1, inter=False))
    assert (bare.keyframe, bare.width, bare.height) == (True, WIDTH, HEIGHT)
    announced = Vp9ScalabilityStructure(2, ((WIDTH // 2, HEIGHT // 2), (640, 360)))
    with_ss = depacketizer.assemble(packetize_vp9([key.data], 1, False, announced))
    assert (with_ss.width, with_ss.height) == (640, 360)
    delta = depacketizer.assemble(packetize_vp9([inter.data], 2, inter=True))
    assert not delta.keyframe
    assert (delta.width, delta.height) == (None, None)  # size copied from a reference


@needs_vp9
def test_vp9_layer_frames_are_joined_into_a_superframe() -> None:
    """libvpx in PyAV cannot make spatial layers, but with a look-ahead it emits superframes
    (a hidden alt-ref frame plus the frame shown): sending each frame of those as its own
    layer frame exercises the same joining, and the result must decode identically."""
    frames = synthetic_clip(32, noise=40)
    for index, frame in enumerate(frames):  # a slow pan, so the encoder wants an alt-ref
        image = np.roll(frame.to_ndarray(), index // 3, axis=1)
        frames[index] = av.VideoFrame.from_ndarray(image, format="yuv420p")
        frames[index].pts = index
    options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "25", "b": "300k"}
    encoded = encode("libvpx-vp9", frames, options)
    superframes = [i for i, p in enumerate(encoded) if len(split_superframe(p.data)) > 1]
    assert superframes, "libvpx produced no superframe to split"

    depacketizer = Vp9Depacketizer()
    pictures = []
    for index, packet in enumerate(encoded):
        layer_frames = split_superframe(packet.data)
        payloads = packetize_vp9(layer_frames, index, not packet.keyframe, mtu=300)
        if len(layer_frames) > 1:
            starts = [Vp9Descriptor.parse(p)[0] for p in payloads]
            assert sum(d.start_of_frame for d in starts) == len(layer_frames)
            assert [depacketizer.starts_picture(p) for p in payloads].count(True) == 1
        pictures.append(depacketizer.assemble(payloads))
    for index in superframes:
        assert split_superframe(pictures[index].data) == split_superframe(encoded[index].data)
        assert not pictures[index].keyframe
    assert pictures[0].keyframe

    original = decode("vp9", [packet.data for packet in encoded])
    rebuilt = decode("vp9", [picture.data for picture in pictures])
    assert len(rebuilt) == len(original) == len(frames)
    for want, got in zip(original, rebuilt, strict=True):
        assert np.array_equal(want.to_ndarray(), got.to_ndarray())


@needs_vp9
@pytest.mark.parametrize("error_resilient", [False, True])
def test_vp9_hidden_frame_decodes_to_the_same_picture(error_resilient: bool) -> None:
    """hide_frame must keep every frame decodable: a hidden frame followed by a
    show_existing_frame of the slot it refreshed shows exactly the original picture."""
    options = {"deadline": "realtime", "error-resilient": "1" if error_resilient else "0"}
    encoded = [packet.data for packet in encode("libvpx-vp9", synthetic_clip(5), options)]
    original = decode("vp9", encoded)
    ref_sizes: list[tuple[int, int] | None] = [None] * 8
    for index, frame in enumerate(encoded):
        header = parse_frame_header(frame, ref_sizes)
        assert header is not None and header.size == (WIDTH, HEIGHT)
        assert header.header_bits is not None
        # The last 16 bits are header_size_in_bytes: the compressed header must fit.
        header_bytes = (header.header_bits + 7) // 8
        bits = int.from_bytes(frame[:header_bytes], "big") >> (
            8 * header_bytes - header.header_bits
        )
        assert 0 < bits & 0xFFFF <= len(frame) - header_bytes
        hidden = hide_frame(frame, header)
        assert hidden is not None and hidden != frame
        hidden_header = parse_frame_header(hidden, ref_sizes)
        assert hidden_header is not None and not hidden_header.show_frame
        slot = (header.refresh_frame_flags & -header.refresh_frame_flags).bit_length() - 1
        show_existing = bytes((0x88 | slot,))  # profile 0, show_existing_frame, slot
        stream = [*encoded[:index], build_superframe([hidden, show_existing])]
        rebuilt = decode("vp9", stream)
        assert len(rebuilt) == index + 1
        assert np.array_equal(rebuilt[-1].to_ndarray(), original[index].to_ndarray())
        for bit in range(8):
            if header.refresh_frame_flags >> bit & 1:
                ref_sizes[bit] = header.size


@needs_vp9
def test_vp9_lower_spatial_layers_are_hidden() -> None:
    """FFmpeg shows every shown frame of a superframe; only the top layer may be shown.
    (Two keyframes of two sizes stand in for a two-layer keyframe picture here: both are
    decodable on their own, so the picture is a valid stream.)"""
    small = encode("libvpx-vp9", synthetic_clip(1, WIDTH // 2, 52))[0].data
    large = encode("libvpx-vp9", synthetic_clip(1))[0].data
    depacketizer = Vp9Depacketizer()
    picture = depacketizer.assemble(packetize_vp9([small, large], 0, inter=False))
    assert picture.keyframe
    assert (picture.width, picture.height) == (WIDTH, HEIGHT)
    infos = [frame_info(part) for part in split_superframe(picture.data)]
    assert [info.show_frame if info else None for info in infos] == [False, True]
    decoded = decode("vp9", [picture.data])
    assert [(frame.width, frame.height) for frame in decoded] == [(WIDTH, HEIGHT)]
    # Same size: hiding could change how the next frame decodes, so both stay shown.
    same = Vp9Depacketizer().assemble(packetize_vp9([large, large], 0, inter=False))
    assert split_superframe(same.data) == [large, large]


def test_vp9_single_layer_frame_is_passed_through() -> None:
    frame = b"\x82\x49\x83\x42\x00" + bytes(range(40))
    payloads = packetize_vp9([frame], 5, inter=False, mtu=20)
    assert len(payloads) > 2
    picture = Vp9Depacketizer().assemble(payloads)
    assert picture.data == frame


@settings(deadline=None)  # timing varies on a busy machine; the work is tiny
@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=8))
def test_vp9_superframe_index_round_trips(frames: list[bytes]) -> None:
    joined = build_superframe(frames)
    assert split_superframe(joined) == frames


def test_vp9_superframe_index_too_many_frames() -> None:
    with pytest.raises(ValueError, match="superframe"):
        build_superframe([b"\x80"] * 9)
    bogus = b"\x80" * 4 + bytes((0xC1, 0xFF, 0xFF, 0xC1))
    with pytest.raises(ValueError, match="superframe index sizes"):
        split_superframe(bogus)


def test_vp9_frame_info_reads_a_hand_made_keyframe_header() -> None:
    # frame_marker 10, profile 0, show_existing 0, key 0, show 1, error_res 0,
    # sync code, color_space 0 + color_range 0, width-1 = 319, height-1 = 179.
    bits = "10" + "00" + "0" + "0" + "1" + "0"
    bits += f"{0x498342:024b}" + "000" + "0" + f"{319:016b}" + f"{179:016b}"
    bits += "0" * (-len(bits) % 8)
    header = int(bits, 2).to_bytes(len(bits) // 8, "big")
    info = frame_info(header)
    assert info is not None
    assert (info.key_frame, info.show_frame, info.width, info.height) == (True, True, 320, 180)
    assert frame_info(b"\x00\x00") is None  # not a VP9 frame marker


pd_diffs = st.lists(st.integers(0, 127), min_size=1, max_size=3).map(tuple)
picture_group_entries = st.builds(
    Vp9PictureGroupEntry,
    tid=st.integers(0, 7),
    switching_up=st.booleans(),
    p_diffs=st.lists(st.integers(0, 255), max_size=3).map(tuple),
)


@st.composite
def scalability_structures(draw: st.DrawFn) -> Vp9ScalabilityStructure:
    layers = draw(st.integers(1, 8))
    size = st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
    resolutions = draw(st.none() | st.lists(size, min_size=layers, max_size=layers).map(tuple))
    group = draw(st.none() | st.lists(picture_group_entries, max_size=6).map(tuple))
    return Vp9ScalabilityStructure(layers, resolutions, group)


@st.composite
def vp9_descriptors(draw: st.DrawFn) -> Vp9Descriptor:
    flexible = draw(st.booleans())
    inter = draw(st.booleans())
    picture_id = draw(st.none() | st.integers(0, 0x7FFF))
    # The M bit only exists with a picture id; a short id must fit in 7 bits.
    long_id = picture_id is None or picture_id > 0x7F or draw(st.booleans())
    layered = draw(st.booleans())
    return Vp9Descriptor(
        start_of_frame=draw(st.booleans()),
        end_of_frame=draw(st.booleans()),
        inter_picture=inter,
        flexible=flexible,
        not_upper_reference=draw(st.booleans()),
        picture_id=picture_id,
        long_picture_id=long_id,
        tid=draw(st.integers(0, 7)) if layered else None,
        sid=draw(st.integers(0, 7)) if layered else None,
        switching_up=layered and draw(st.booleans()),
        inter_layer=layered and draw(st.booleans()),
        tl0_pic_idx=draw(st.integers(0, 255)) if layered and not flexible else None,
        p_diffs=draw(pd_diffs) if flexible and inter else (),
        ss=draw(st.none() | scalability_structures()),
    )


@settings(deadline=None)  # timing varies on a busy machine; the work is tiny
@given(vp9_descriptors(), st.binary(max_size=8))
def test_vp9_descriptor_round_trips(descriptor: Vp9Descriptor, tail: bytes) -> None:
    assert Vp9Descriptor.parse(bytes(descriptor) + tail) == (descriptor, tail)


def test_vp9_descriptor_known_bytes() -> None:
    # I, L, B, E in flexible mode with P: pid 0x1234, TID 2 U SID 1 D, two P_DIFFs.
    data = bytes((0xFC, 0x92, 0x34, 0x53, 0x03, 0x04)) + b"payload"
    descriptor, rest = Vp9Descriptor.parse(data)
    assert rest == b"payload"
    assert descriptor == Vp9Descriptor(
        start_of_frame=True,
        end_of_frame=True,
        inter_picture=True,
        flexible=True,
        picture_id=0x1234,
        tid=2,
        sid=1,
        switching_up=True,
        inter_layer=True,
        p_diffs=(1, 2),
    )


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"", "payload descriptor"),
        (b"\x88", "picture id"),
        (b"\x88\x81", "picture id"),
        (b"\xa8\x05", "layer indices"),
        (b"\x28\x00", "TL0PICIDX"),
        (b"\x58", "P_DIFF"),
        (b"\x58\x03", "P_DIFF"),
        (b"\x58\x03\x05\x07\x09", "P_DIFF list"),
        (b"\x0a", "scalability structure"),
        (b"\x0a\x30\x01\x40\x00", "SS resolution"),
        (b"\x0a\x08", "N_G"),
        (b"\x0a\x08\x02\x04\x05", "picture group entry"),
        (b"\x0a\x08\x01\x0c\x05", "picture group P_DIFF"),
    ],
)
def test_vp9_cut_descriptor_names_the_field(data: bytes, field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(field)):
        Vp9Descriptor.parse(data)


def test_vp9_picture_with_missing_begin_or_end() -> None:
    start = bytes(Vp9Descriptor(True, False)) + b"\x82"
    middle = bytes(Vp9Descriptor(False, False)) + b"\x00"
    end = bytes(Vp9Descriptor(False, True)) + b"\x00"
    depacketizer = Vp9Depacketizer()
    with pytest.raises(ValueError, match="without its beginning"):
        depacketizer.assemble([middle, end])
    with pytest.raises(ValueError, match="without its end"):
        depacketizer.assemble([start, middle])
    with pytest.raises(ValueError, match="without its end"):
        depacketizer.assemble([start, start, end])
    with pytest.raises(ValueError, match="no payloads"):
        depacketizer.assemble([])


# --- H.265 -------------------------------------------------------------------------------

needs_hevc = pytest.mark.skipif(
    not (has_codec("libx265", "w") and has_codec("hevc", "r")), reason="no H.265 codecs"
)
X265_OPTIONS = {"preset": "ultrafast", "x265-params": "log-level=error:keyint=4"}


@needs_hevc
def test_h265_clip_survives_packetization() -> None:
    encoded = encode("libx265", synthetic_clip(FRAMES), X265_OPTIONS)
    assert len(encoded) == FRAMES
    depacketizer = H265Depacketizer()
    assert depacketizer.extradata() is None
    pictures = depacketize(depacketizer, encoded, lambda packet, _: packetize_h265(packet.data))
    assert [picture.keyframe for picture in pictures] == [p.keyframe for p in encoded]
    assert pictures[0].keyframe
    assert (pictures[0].width, pictures[0].height) == (WIDTH, HEIGHT)
    assert [annexb_units(picture.data) for picture in pictures] == [
        annexb_units(packet.data) for packet in encoded
    ]
    extradata = depacketizer.extradata()
    assert extradata is not None
    types = [(unit[0] >> 1) & 0x3F for unit in annexb_units(extradata)]
    assert types == [32, 33, 34]
    check_decoded(decode("hevc", [p.data for p in pictures], extradata), FRAMES)


@needs_hevc
def test_h265_packet_kinds_are_all_used() -> None:
    encoded = encode("libx265", synthetic_clip(1), X265_OPTIONS)
    payloads = packetize_h265(encoded[0].data)
    kinds = {(payload[0] >> 1) & 0x3F for payload in payloads}
    assert {48, 49} <= kinds  # parameter sets aggregated, the big IDR slice fragmented
    small = packetize_h265(encoded[0].data, mtu=100_000)
    assert 48 in {(payload[0] >> 1) & 0x3F for payload in small}


@needs_hevc
def test_h265_sps_cropping() -> None:
    encoded = encode("libx265", synthetic_clip(1), X265_OPTIONS)
    sps = next(unit for unit in annexb_units(encoded[0].data) if (unit[0] >> 1) & 0x3F == 33)
    assert sps_dimensions(sps) == (WIDTH, HEIGHT)


def test_h265_irap_inside_an_aggregation_packet() -> None:
    idr = bytes(H265NalHeader(19)) + b"\xaf\x00"
    sei = bytes(H265NalHeader(39)) + b"\x05\x01"
    aggregate = bytes(H265NalHeader(48)) + b"".join(
        len(unit).to_bytes(2, "big") + unit for unit in (sei, idr)
    )
    picture = H265Depacketizer().assemble([aggregate])
    assert picture.keyframe
    assert picture.data == b"\x00\x00\x00\x01" + sei + b"\x00\x00\x00\x01" + idr
    trail = bytes(H265NalHeader(1)) + b"\x11"
    assert not H265Depacketizer().assemble([trail]).keyframe


@settings(deadline=None)  # timing varies on a busy machine; the work is tiny
@given(
    st.builds(
        H265NalHeader,
        nal_type=st.integers(0, 63),
        layer_id=st.integers(0, 63),
        temporal_id_plus1=st.integers(0, 7),
        forbidden=st.booleans(),
    ),
    st.builds(H265FuHeader, st.booleans(), st.booleans(), st.integers(0, 63)),
    st.binary(max_size=8),
)
def test_h265_headers_round_trip(header: H265NalHeader, fu: H265FuHeader, tail: bytes) -> None:
    assert H265NalHeader.parse(bytes(header) + tail) == (header, tail)
    assert H265FuHeader.parse(bytes(fu) + tail) == (fu, tail)


def _fu(start: bool, end: bool) -> bytes:
    return bytes(H265NalHeader(49)) + bytes(H265FuHeader(start, end, 1)) + b"\x01\x02"


@pytest.mark.parametrize(
    ("payloads", "message"),
    [
        ([b""], "payload header is cut"),
        ([b"\x02"], "payload header is cut"),
        ([bytes(H265NalHeader(48)) + b"\x00"], "aggregation unit size is cut"),
        ([bytes(H265NalHeader(48)) + b"\x00\x09\x02\x01"], "aggregation unit of 9 bytes"),
        ([bytes(H265NalHeader(48))], "no units"),
        ([bytes(H265NalHeader(49))], "FU header is cut"),
        ([_fu(False, True)], "without its start"),
        ([_fu(True, False)], "without its end"),
        ([_fu(True, False), _fu(True, True)], "without its end"),
        ([_fu(True, False), bytes(H265NalHeader(1)) + b"\x00"], "without its end"),
        ([bytes(H265NalHeader(50)) + b"\x00"], "not supported"),
    ],
)
def test_h265_malformed_payloads(payloads: list[bytes], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        H265Depacketizer().assemble(payloads)


# --- AV1 ---------------------------------------------------------------------------------

needs_av1 = pytest.mark.skipif(
    not (has_codec("libsvtav1", "w") and has_codec("libdav1d", "r")), reason="no AV1 codecs"
)
SVT_OPTIONS = {"preset": "12"}


@pytest.fixture(scope="module")
def av1_clip() -> list[Encoded]:
    if not (has_codec("libsvtav1", "w") and has_codec("libdav1d", "r")):
        pytest.skip("no AV1 codecs")
    return encode("libsvtav1", synthetic_clip(FRAMES), SVT_OPTIONS)


@needs_av1
def test_av1_clip_survives_packetization(av1_clip: list[Encoded]) -> None:
    assert len(av1_clip) == FRAMES
    depacketizer = Av1Depacketizer()
    pictures = depacketize(
        depacketizer, av1_clip, lambda packet, _: packetize_av1(packet.data, packet.keyframe)
    )
    assert [picture.keyframe for picture in pictures] == [p.keyframe for p in av1_clip]
    assert pictures[0].keyframe
    assert (pictures[0].width, pictures[0].height) == (WIDTH, HEIGHT)
    for picture, packet in zip(pictures, av1_clip, strict=True):
        assert picture.data.startswith(b"\x12\x00")
        assert picture.data == packet.data  # SVT-AV1 writes the same shortest sizes
    extradata = depacketizer.extradata()
    assert extradata is not None
    assert extradata[0] == 0x81
    assert extradata[1] >> 5 == 0  # main profile
    assert extradata[2] & 0x0F == 0b1100  # 4:2:0, chroma position unknown
    config_obu, _ = ObuHeader.parse(extradata[4:])
    assert config_obu == ObuHeader(OBU_SEQUENCE_HEADER, has_size_field=True)
    check_decoded(decode("libdav1d", [p.data for p in pictures], extradata), FRAMES)


@needs_av1
def test_av1_fragments_and_keyframe_without_n_bit(av1_clip: list[Encoded]) -> None:
    payloads = packetize_av1(av1_clip[0].data, new_sequence=False, mtu=200)
    headers = [Av1AggregationHeader.parse(payload)[0] for payload in payloads]
    assert any(h.first_continues and h.last_continues for h in headers)
    assert 1 in {h.element_count for h in headers}
    picture = Av1Depacketizer().assemble(payloads)
    assert picture.keyframe  # sequence header + KEY_FRAME header, no N bit needed
    assert picture.data == av1_clip[0].data
    later = Av1Depacketizer().assemble(packetize_av1(av1_clip[1].data, new_sequence=False))
    assert not later.keyframe
    assert (later.width, later.height) == (None, None)


@needs_av1
def test_av1_sized_obus_and_temporal_delimiters_from_the_sender(
    av1_clip: list[Encoded],
) -> None:
    """Senders SHOULD strip OBU sizes and temporal delimiters; one that does not must still
    give the same temporal unit."""
    data = av1_clip[0].data
    elements = []
    pos = 0
    while pos < len(data):
        _, rest = ObuHeader.parse(data[pos:])
        size, after = read_leb128(rest, 0, "size")
        length = len(data) - pos - len(rest) + after + size
        elements.append(data[pos : pos + length])
        pos += length
    assert ObuHeader.parse(elements[0])[0].obu_type == 2  # the temporal delimiter is sent
    body = b"".join(leb128(len(element)) + element for element in elements)
    payload = bytes(Av1AggregationHeader(new_sequence=True)) + body
    picture = Av1Depacketizer().assemble([payload])
    assert picture.data == data
    assert picture.keyframe


def test_av1_obu_extension_is_kept() -> None:
    obu = bytes(ObuHeader(4, temporal_id=2, spatial_id=1)) + b"\xaa\xbb"
    payload = bytes(Av1AggregationHeader(element_count=1)) + obu
    picture = Av1Depacketizer().assemble([payload])
    assert picture.data == b"\x12\x00" + bytes(ObuHeader(4, True, 2, 1)) + b"\x02\xaa\xbb"
    assert not picture.keyframe


@settings(deadline=None)  # timing varies on a busy machine; the work is tiny
@given(
    st.builds(Av1AggregationHeader, st.booleans(), st.booleans(), st.integers(0, 3), st.booleans()),
    st.builds(ObuHeader, st.integers(0, 15), st.booleans())
    | st.builds(ObuHeader, st.integers(0, 15), st.booleans(), st.integers(0, 7), st.integers(0, 3)),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=8),
)
def test_av1_headers_round_trip(
    aggregation: Av1AggregationHeader, obu: ObuHeader, value: int, tail: bytes
) -> None:
    assert Av1AggregationHeader.parse(bytes(aggregation) + tail) == (aggregation, tail)
    assert ObuHeader.parse(bytes(obu) + tail) == (obu, tail)
    coded = leb128(value)
    assert read_leb128(coded + tail, 0, "value") == (value, len(coded))


def _element(data: bytes) -> bytes:
    return leb128(len(data)) + data


@pytest.mark.parametrize(
    ("payloads", "message"),
    [
        ([b""], "aggregation header is cut"),
        ([b"\x00\x80"], "OBU element length is cut"),
        ([b"\x00\x05\x20"], "OBU element of 5 bytes is cut"),
        ([b"\x00"], "no OBU elements"),
        ([b"\x20\x01\x20"], "W says 2"),
        ([b"\x10"], "W says 1"),
        ([b"\x90\x20"], "never started (Z bit)"),
        ([b"\x50\x30", b"\x10\x30"], "without its continuation (Y bit)"),
        ([b"\x50\x30"], "past the picture's last packet (Y bit)"),
        ([b"\x10\x34"], "OBU extension header is cut"),
        ([b"\x10\xb0"], "forbidden bit"),
        ([b"\x10\x22\x05\x00"], "OBU of 5 bytes is cut"),
        ([b"\x10\x22\x80"], "OBU size field is cut"),
        ([b"\x00" + _element(b"")], "OBU header is cut"),
    ],
)
def test_av1_malformed_payloads(payloads: list[bytes], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Av1Depacketizer().assemble(payloads)


def test_av1_packetizer_strips_sizes() -> None:
    unit = b"\x12\x00" + b"\x22\x02\xaa\xbb"  # TD, then a sized tile group
    assert temporal_unit_obus(unit) == [b"\x20\xaa\xbb"]


def test_av1_many_small_obus_use_lengths_everywhere() -> None:
    """More than three elements in a packet: W = 0, every element carries its length."""
    tile_groups = [bytes(ObuHeader(4, True)) + leb128(3) + bytes((n, n, n)) for n in range(5)]
    unit = b"\x12\x00" + b"".join(tile_groups)
    payloads = packetize_av1(unit, new_sequence=False)
    assert len(payloads) == 1
    assert Av1AggregationHeader.parse(payloads[0])[0].element_count == 0
    assert Av1Depacketizer().assemble(payloads).data == unit


def test_av1_cut_sequence_header_is_not_kept() -> None:
    with pytest.raises(ValueError, match="AV1 sequence header is cut"):
        Av1SequenceHeader.parse(b"\x00")
    cut = bytes(ObuHeader(OBU_SEQUENCE_HEADER)) + b"\x00"
    depacketizer = Av1Depacketizer()
    picture = depacketizer.assemble([bytes(Av1AggregationHeader(element_count=1)) + cut])
    assert (picture.width, picture.height) == (None, None)
    assert depacketizer.extradata() is None


# -- Opus silence ------------------------------------------------------------------------------
@pytest.mark.parametrize("depay_class", ["opus", "multiopus"])
@given(samples=st.integers(min_value=0, max_value=20_000))
@settings(max_examples=60, deadline=None)
def test_opus_silence_is_never_shorter_than_the_pre_skip_and_decodes_to_zeros(
    depay_class: str, samples: int
) -> None:
    """A filled gap lasts its length to the nearest 2.5 ms, within 3.75 ms for gaps too short
    for one packet of at least :data:`SHORTEST_SILENCE`; each packet is as long as its TOC
    says, and they decode (Opus and multiopus) to that many zeros, the pre-skip aside. No
    packet is shorter than the pre-skip: a reader that seeks to one would drop part of the
    next packet too, and put the audio after it early."""
    depay = OpusDepacketizer() if depay_class == "opus" else MultiopusDepacketizer()
    packets = list(depay.silence(samples))
    total = sum(size for _, size in packets)
    assert all(size >= SHORTEST_SILENCE > PRE_SKIP for _, size in packets)
    assert total % 120 == 0
    assert abs(total - samples) <= (60 if samples >= SHORTEST_SILENCE else 180)
    decoder = av.CodecContext.create("opus", "r")
    decoder.extradata = depay.extradata()  # multiopus: the streams and their mapping
    decoder.sample_rate = 48000
    decoded = 0
    for data, size in packets:
        assert packet_samples(data) == size
        frames = decoder.decode(av.Packet(data))
        decoded += sum(f.samples for f in frames)
        assert all(f.layout.nb_channels == depay.channels for f in frames)
        assert all(not np.any(f.to_ndarray()) for f in frames)
    # The decoder drops the pre-skip from the start of the first packets.
    assert decoded == max(0, total - PRE_SKIP)
