"""Test-side RTP packetizers: the senders' half, so depacketizers can be checked end to end.

Each turns an encoder's output for one picture into the RTP payloads a WebRTC sender would
emit at a given MTU. They are deliberately simple but exercise every packet kind the
depacketizers must handle (fragments, aggregates, several layer frames per picture).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from melter.depay.av1 import (
    OBU_TEMPORAL_DELIMITER,
    OBU_TILE_LIST,
    Av1AggregationHeader,
    ObuHeader,
    leb128,
    read_leb128,
)
from melter.depay.h265 import (
    AGGREGATION_PACKET,
    FRAGMENTATION_UNIT,
    H265FuHeader,
    H265NalHeader,
)
from melter.depay.vp9 import Vp9Descriptor, Vp9ScalabilityStructure

MTU = 1200


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for pos in range(0, len(data), size):
        yield data[pos : pos + size]


def packetize_vp9(
    layer_frames: Sequence[bytes],
    picture_id: int,
    inter: bool,
    ss: Vp9ScalabilityStructure | None = None,
    mtu: int = MTU,
) -> list[bytes]:
    """RFC 9628 payloads for one picture made of ``layer_frames`` (one per spatial layer).

    A single layer frame goes out in non-flexible mode without layer indices, the way a
    plain (non-SVC) sender does; several go out in flexible mode with SID = their index.
    """
    layered = len(layer_frames) > 1
    payloads = []
    for sid, frame in enumerate(layer_frames):
        pieces = list(_chunks(frame, mtu - 16))
        for index, piece in enumerate(pieces):
            descriptor = Vp9Descriptor(
                start_of_frame=index == 0,
                end_of_frame=index == len(pieces) - 1,
                inter_picture=inter,
                flexible=layered,
                picture_id=picture_id & 0x7FFF,
                tid=0 if layered else None,
                sid=sid if layered else None,
                inter_layer=layered and sid > 0,
                p_diffs=(1,) if layered and inter else (),
                ss=ss if sid == 0 and index == 0 else None,
            )
            payloads.append(bytes(descriptor) + piece)
    return payloads


def annexb_units(data: bytes) -> list[bytes]:
    """NAL units of an Annex-B byte stream (start codes and trailing zero bytes removed)."""
    units = []
    for part in data.split(b"\x00\x00\x01"):
        unit = part.rstrip(b"\x00")
        if unit:
            units.append(unit)
    return units


def packetize_h265(access_unit: bytes, mtu: int = MTU) -> list[bytes]:
    """RFC 7798 payloads for one Annex-B access unit.

    Runs of small NAL units (parameter sets, SEI) share an aggregation packet, units larger
    than the MTU are split into fragmentation units, the rest go out as single NAL units.
    """
    payloads: list[bytes] = []
    batch: list[bytes] = []

    def flush() -> None:
        if len(batch) == 1:
            payloads.append(batch[0])
        elif batch:
            headers = [H265NalHeader.parse(unit)[0] for unit in batch]
            header = H265NalHeader(
                AGGREGATION_PACKET,
                min(h.layer_id for h in headers),
                min(h.temporal_id_plus1 for h in headers),
            )
            body = b"".join(len(unit).to_bytes(2, "big") + unit for unit in batch)
            payloads.append(bytes(header) + body)
        batch.clear()

    for unit in annexb_units(access_unit):
        if len(unit) > mtu:
            flush()
            header, body = H265NalHeader.parse(unit)
            fu_header = H265NalHeader(FRAGMENTATION_UNIT, header.layer_id, header.temporal_id_plus1)
            pieces = list(_chunks(body, mtu - 3))
            for index, piece in enumerate(pieces):
                fu = H265FuHeader(index == 0, index == len(pieces) - 1, header.nal_type)
                payloads.append(bytes(fu_header) + bytes(fu) + piece)
            continue
        size = 2 + sum(2 + len(queued) for queued in batch) + 2 + len(unit)
        if batch and size > mtu:
            flush()
        batch.append(unit)
    flush()
    return payloads


def temporal_unit_obus(data: bytes) -> list[bytes]:
    """OBUs of a low-overhead temporal unit as RTP carries them: size fields stripped,
    temporal delimiters and tile lists left out."""
    obus = []
    pos = 0
    while pos < len(data):
        header, rest = ObuHeader.parse(data[pos:])
        header_size = len(data) - pos - len(rest)
        if not header.has_size_field:
            raise ValueError("test packetizer wants sized OBUs")
        size, body_pos = read_leb128(rest, 0, "OBU size")
        payload = rest[body_pos : body_pos + size]
        pos += header_size + body_pos + size
        if header.obu_type in (OBU_TEMPORAL_DELIMITER, OBU_TILE_LIST):
            continue
        bare = ObuHeader(header.obu_type, False, header.temporal_id, header.spatial_id)
        obus.append(bytes(bare) + payload)
    return obus


def packetize_av1(temporal_unit: bytes, new_sequence: bool, mtu: int = MTU) -> list[bytes]:
    """AV1 RTP payloads for one temporal unit (low-overhead format, as encoders emit it).

    OBUs are packed greedily; an OBU that does not fit starts in the current packet and
    continues in the next ones (Y/Z bits). W is the element count when it is 1..3, so the
    last element goes without a length, and 0 (every element with a length) otherwise.
    """
    packets: list[tuple[list[bytes], bool, bool]] = []  # elements, Z, Y
    elements: list[bytes] = []
    continues = False
    room = mtu - 1

    def close(last_continues: bool) -> None:
        nonlocal elements, continues, room
        packets.append((elements, continues, last_continues))
        elements, continues, room = [], last_continues, mtu - 1

    for obu in temporal_unit_obus(temporal_unit):
        rest = obu
        while rest:
            cost = len(leb128(len(rest))) + len(rest)
            if cost <= room:
                elements.append(rest)
                room -= cost
                rest = b""
            elif room < 8:
                close(False)
            else:
                take = room - len(leb128(room))
                elements.append(rest[:take])
                rest = rest[take:]
                close(True)
    if elements:
        close(False)
    payloads = []
    for index, (items, first_continues, last_continues) in enumerate(packets):
        count = len(items) if len(items) <= 3 else 0
        header = Av1AggregationHeader(
            first_continues=first_continues,
            last_continues=last_continues,
            element_count=count,
            new_sequence=new_sequence and index == 0,
        )
        body = bytearray()
        for position, item in enumerate(items):
            if not (count and position == count - 1):
                body += leb128(len(item))
            body += item
        payloads.append(bytes(header) + bytes(body))
    return payloads
