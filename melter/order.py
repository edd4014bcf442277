"""Put a recording's RTP packets back in sending order.

Janus stores packets as they arrived: reordered, sometimes duplicated, with 16-bit sequence
numbers that wrap and SSRCs that change when a sender restarts or renegotiates. This stage
extends sequence numbers to one track-wide counter (an SSRC change starts a new segment that
continues the counter, so nothing is lost — janus-pp-rec drops such packets), drops duplicates
and restores order with a bounded buffer, so memory stays flat for any length.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from melter.mjr.reader import MjrReader
from melter.mjr.rtp import RtpPacket

#: Packets held back to restore order. Reordering on real networks spans a few packets; a
#: packet later than this many successors is counted as late and dropped.
REORDER_WINDOW = 256
#: A sequence jump larger than this (without an SSRC change) is a sender restart, not loss.
SEQ_RESTART = 3000
_RECENT = 2048


@dataclass(slots=True)
class OrderedPacket:
    """A packet in sending order, with a track-wide sequence number and its file position."""

    index: int
    offset: int
    arrival_us: int | None
    packet: RtpPacket
    segment: int


@dataclass
class OrderStats:
    packets: int = 0
    invalid: int = 0
    duplicates: int = 0
    reordered: int = 0
    late: int = 0
    lost: int = 0
    ssrcs: list[int] = field(default_factory=list)
    ssrc_changes: int = 0
    seq_restarts: int = 0
    invalid_offsets: list[int] = field(default_factory=list)
    first_invalid_reason: str | None = None


def ordered_packets(
    reader: MjrReader, stats: OrderStats, window: int = REORDER_WINDOW
) -> Iterator[OrderedPacket]:
    """Yield the recording's valid RTP packets in sequence order, deduplicated."""
    base_us = reader.header.first_packet_us or reader.header.created_us or 0
    heap: list[tuple[int, OrderedPacket]] = []
    in_heap: set[int] = set()
    recent: deque[int] = deque(maxlen=_RECENT)
    recent_set: set[int] = set()
    last_emitted = -1
    max_pushed = -1
    segment = -1
    seg_ssrc: int | None = None
    prev_ssrc: int | None = None
    seg_base = 0
    seg_first_seq = 0
    seg_highest = 0

    def emit_one() -> OrderedPacket:
        nonlocal last_emitted
        ext, item = heapq.heappop(heap)
        in_heap.discard(ext)
        if last_emitted >= 0 and ext > last_emitted + 1:
            stats.lost += ext - last_emitted - 1
        last_emitted = ext
        if len(recent) == recent.maxlen:
            recent_set.discard(recent[0])
        recent.append(ext)
        recent_set.add(ext)
        return item

    for frame in reader.frames():
        try:
            packet = RtpPacket.parse(frame.data)
        except ValueError as exc:
            stats.invalid += 1
            if len(stats.invalid_offsets) < 20:
                stats.invalid_offsets.append(frame.offset)
            if stats.first_invalid_reason is None:
                stats.first_invalid_reason = f"byte {frame.offset}: {exc}"
            continue
        arrival = None if frame.arrival_ms is None else base_us + frame.arrival_ms * 1000
        new_segment = seg_ssrc is None or packet.ssrc != seg_ssrc
        if not new_segment:
            highest16 = (seg_first_seq + seg_highest) & 0xFFFF
            delta = (packet.sequence_number - highest16) & 0xFFFF
            if delta >= 0x8000:
                delta -= 0x10000
            if abs(delta) > SEQ_RESTART:
                stats.seq_restarts += 1
                new_segment = True
        elif seg_ssrc is not None and packet.ssrc == prev_ssrc:
            # A straggler of the SSRC we just left: too late to place.
            stats.late += 1
            continue
        if new_segment:
            while heap:
                yield emit_one()
            if seg_ssrc is not None and packet.ssrc != seg_ssrc:
                stats.ssrc_changes += 1
                prev_ssrc = seg_ssrc
            if packet.ssrc not in stats.ssrcs:
                stats.ssrcs.append(packet.ssrc)
            segment += 1
            seg_ssrc = packet.ssrc
            seg_base = last_emitted + 1
            seg_first_seq = packet.sequence_number
            seg_highest = 0
            delta = 0
            max_pushed = last_emitted
        ext = seg_base + seg_highest + delta
        if delta > 0:
            seg_highest += delta
        if ext <= last_emitted or ext in in_heap:
            if ext in in_heap or ext in recent_set:
                stats.duplicates += 1
            else:
                stats.late += 1
            continue
        if ext < max_pushed:
            stats.reordered += 1
        else:
            max_pushed = ext
        stats.packets += 1
        heapq.heappush(heap, (ext, OrderedPacket(ext, frame.offset, arrival, packet, segment)))
        in_heap.add(ext)
        if len(heap) > window:
            yield emit_one()
    while heap:
        yield emit_one()
