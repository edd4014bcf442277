"""Put a recording's RTP packets back in sending order.

Janus stores packets as they arrived: reordered, sometimes duplicated, with 16-bit sequence
numbers that wrap and SSRCs that change when a sender restarts or renegotiates. This stage
extends sequence numbers to one track-wide counter (an SSRC change starts a new segment that
continues the counter, so nothing is lost — janus-pp-rec drops such packets), drops duplicates
and restores order with a bounded buffer, so memory stays flat for any length.

A new SSRC must show twice in a row before the track switches to it: a single packet with a
damaged SSRC is dropped as invalid instead of cutting the track. Switching back to an SSRC
seen before continues that SSRC's numbering; its stragglers (numbers it already passed) are
late.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from melter.mjr.reader import MjrFrame, MjrReader
from melter.mjr.rtp import RtpPacket

#: Packets held back to restore order. Reordering on real networks spans a few packets; a
#: packet later than this many successors is counted as late and dropped.
REORDER_WINDOW = 256
#: A sequence jump larger than this (without an SSRC change) is a sender restart, not loss.
SEQ_RESTART = 3000
#: Packets of a new SSRC needed in a row before the track switches to it.
SSRC_CONFIRM = 2
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
    stray_ssrc: int = 0
    invalid_offsets: list[int] = field(default_factory=list)
    first_invalid_reason: str | None = None


@dataclass
class _SsrcState:
    """Sequence-number extension of one SSRC."""

    first_seq: int
    highest: int = 0  # relative to first_seq, extended

    def relative(self, seq: int) -> int:
        highest16 = (self.first_seq + self.highest) & 0xFFFF
        delta = (seq - highest16) & 0xFFFF
        if delta >= 0x8000:
            delta -= 0x10000
        return self.highest + delta


class _Orderer:
    def __init__(self, stats: OrderStats, window: int) -> None:
        self.stats = stats
        self.window = window
        self.heap: list[tuple[int, int, OrderedPacket]] = []
        self.in_heap: set[int] = set()
        self.recent: deque[int] = deque(maxlen=_RECENT)
        self.recent_set: set[int] = set()
        self.last_emitted = -1
        self.last_segment = -1
        self.max_pushed = -1
        self.segment = -1
        self.ssrc: int | None = None
        self.states: dict[int, _SsrcState] = {}
        # Track-wide index of relative sequence 0 in the current segment. New segments start
        # a window above the last index, so an early packet arriving late still fits.
        self.base = 0
        self.counter = 0

    def _emit_one(self) -> OrderedPacket:
        ext, _, item = heapq.heappop(self.heap)
        self.in_heap.discard(ext)
        return self._emitted(ext, item)

    def _emitted(self, ext: int, item: OrderedPacket) -> OrderedPacket:
        if item.segment == self.last_segment and ext > self.last_emitted + 1:
            self.stats.lost += ext - self.last_emitted - 1
        self.last_emitted = ext
        self.last_segment = item.segment
        if len(self.recent) == self.recent.maxlen:
            self.recent_set.discard(self.recent[0])
        self.recent.append(ext)
        self.recent_set.add(ext)
        return item

    def flush(self, out: list[OrderedPacket]) -> None:
        while self.heap:
            out.append(self._emit_one())

    def _new_segment(
        self, ssrc: int, state: _SsrcState, continuing: bool, out: list[OrderedPacket]
    ) -> None:
        self.flush(out)
        if self.ssrc is not None and ssrc != self.ssrc:
            self.stats.ssrc_changes += 1
        if ssrc not in self.stats.ssrcs:
            self.stats.ssrcs.append(ssrc)
        self.segment += 1
        self.ssrc = ssrc
        start = self.last_emitted + 1 + self.window
        # Relative numbers already used by this SSRC come before the new segment's base.
        self.base = start - (state.highest + 1 if continuing else 0)
        self.max_pushed = self.last_emitted

    def push(
        self, packet: RtpPacket, frame: MjrFrame, arrival: int | None, out: list[OrderedPacket]
    ) -> None:
        """Take one packet; append what can be released, in order, to ``out``."""
        stats = self.stats
        state = self.states.get(packet.ssrc)
        if packet.ssrc != self.ssrc:
            if state is None:
                state = _SsrcState(packet.sequence_number)
                self.states[packet.ssrc] = state
                self._new_segment(packet.ssrc, state, False, out)
                relative = 0
            else:
                relative = state.relative(packet.sequence_number)
                if relative <= state.highest:
                    stats.late += 1  # a straggler of an SSRC the track has left
                    return
                self._new_segment(packet.ssrc, state, True, out)
        else:
            assert state is not None
            relative = state.relative(packet.sequence_number)
            if abs(relative - state.highest) > SEQ_RESTART:
                stats.seq_restarts += 1
                state = _SsrcState(packet.sequence_number)
                self.states[packet.ssrc] = state
                self.ssrc = None  # no "change" to count: same SSRC, new numbering
                self._new_segment(packet.ssrc, state, False, out)
                relative = 0
        if relative > state.highest:
            state.highest = relative
        ext = self.base + relative
        if ext <= self.last_emitted or ext in self.in_heap:
            if ext in self.in_heap or ext in self.recent_set:
                stats.duplicates += 1
            else:
                stats.late += 1
            return
        if ext < self.max_pushed:
            stats.reordered += 1
        else:
            self.max_pushed = ext
        stats.packets += 1
        # Published indices run on without the room left between segments.
        index = ext - self.window * (self.segment + 1)
        item = OrderedPacket(index, frame.offset, arrival, packet, self.segment)
        if ext == self.last_emitted + 1 and not self.heap:
            # In order, nothing waiting: straight through (the common case).
            out.append(self._emitted(ext, item))
            return
        self.counter += 1
        heapq.heappush(self.heap, (ext, self.counter, item))
        self.in_heap.add(ext)
        # Release what is now contiguous; hold the rest until the window is full.
        heap = self.heap
        while heap and (heap[0][0] == self.last_emitted + 1 or len(heap) > self.window):
            out.append(self._emit_one())


def ordered_packets(
    reader: MjrReader, stats: OrderStats, window: int = REORDER_WINDOW
) -> Iterator[OrderedPacket]:
    """Yield the recording's valid RTP packets in sequence order, deduplicated."""
    base_us = reader.header.first_packet_us or reader.header.created_us or 0
    orderer = _Orderer(stats, window)
    out: list[OrderedPacket] = []
    # Packets of an SSRC not yet confirmed (see module docstring).
    pending: list[tuple[RtpPacket, MjrFrame, int | None]] = []
    parse = RtpPacket.parse
    for frame in reader.frames():
        try:
            packet = parse(frame.data)
        except ValueError as exc:
            stats.invalid += 1
            if len(stats.invalid_offsets) < 20:
                stats.invalid_offsets.append(frame.offset)
            if stats.first_invalid_reason is None:
                stats.first_invalid_reason = f"byte {frame.offset}: {exc}"
            continue
        arrival = None if frame.arrival_ms is None else base_us + frame.arrival_ms * 1000
        if packet.ssrc == orderer.ssrc and not pending:
            orderer.push(packet, frame, arrival, out)
        else:
            known = orderer.ssrc is None or packet.ssrc in orderer.states
            if pending:
                if packet.ssrc == pending[0][0].ssrc:
                    pending.append((packet, frame, arrival))
                    if len(pending) >= SSRC_CONFIRM:
                        for item in pending:
                            orderer.push(*item, out)
                        pending.clear()
                    continue
                # The unconfirmed SSRC did not last: a damaged packet, not a new sender.
                stats.stray_ssrc += len(pending)
                stats.invalid += len(pending)
                pending.clear()
                known = packet.ssrc == orderer.ssrc or packet.ssrc in orderer.states
            if known:
                orderer.push(packet, frame, arrival, out)
            else:
                pending.append((packet, frame, arrival))
        if out:
            yield from out
            out.clear()
    for item in pending:  # a new SSRC in the very last packets: nothing contradicts it
        orderer.push(*item, out)
    orderer.flush(out)
    yield from out
