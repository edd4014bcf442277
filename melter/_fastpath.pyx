# cython: language_level=3, boundscheck=False, cdivision=True
"""The two passes of :mod:`melter.track`, compiled, for what nearly every recording holds.

The Python stages (:mod:`melter.mjr.reader`, :mod:`melter.mjr.rtp`, :mod:`melter.order`,
:mod:`melter.track`) define the behaviour. Run per packet in Python they cost about 10 µs a
packet and pass, so an hour of audio takes seconds. This module does the same steps with C
types for MJR00002 files of Opus or VP8 without RED, and gives the same results: same
statistics, pieces, gaps, frames and times, to the last bit (the tests compare both).

Anything it leaves to the Python stages — a damaged or cut frame, a packet that is not valid
RTP — raises :class:`Fallback` from the first pass, and :func:`melter.track.analyze` runs them
instead, whose warnings and salvage rules then apply. The second pass reads exactly as far as
the first did.
"""

import heapq

from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.math cimport fabs, nearbyint
from libc.stdint cimport int64_t, uint32_t
from libc.string cimport memcmp, memcpy, memmove

from melter.order import REORDER_WINDOW, SEQ_RESTART, SSRC_CONFIRM
from melter.order import _RECENT as RECENT_EMITTED

from melter.errors import InputError

cdef enum:
    RECENT_SIZE = 2048
    MAX_ELEMENTS = 64
    MAX_RTP_FRAME = 1500
    ARRIVAL_WRAP_WINDOW_MS = 3600000
    READ_BUFFER = 262144

# melter.track's constants (kept equal by a test: this module cannot import melter.track,
# which imports it).
cdef double JUMP_TOLERANCE_S = 0.5
cdef double JUMP_CONFIRM_S = 1.0
cdef double MAX_DELAY_S = 10.0
cdef int MIN_WINDOW_PACKETS = 5
cdef double ENVELOPE_WINDOW_S = 2.0
cdef double VIDEO_GAP_S = 0.5
cdef double OFFSET_SPAN_S = 3.0

CONSTANTS = {
    "JUMP_TOLERANCE_S": JUMP_TOLERANCE_S,
    "JUMP_CONFIRM_S": JUMP_CONFIRM_S,
    "MAX_DELAY_S": MAX_DELAY_S,
    "MIN_WINDOW_PACKETS": MIN_WINDOW_PACKETS,
    "ENVELOPE_WINDOW_S": ENVELOPE_WINDOW_S,
    "VIDEO_GAP_S": VIDEO_GAP_S,
    "OFFSET_SPAN_S": OFFSET_SPAN_S,
    "MAX_RTP_FRAME": MAX_RTP_FRAME,
    "ARRIVAL_WRAP_WINDOW_MS": ARRIVAL_WRAP_WINDOW_MS,
    "RECENT_SIZE": RECENT_SIZE,
}

# Samples at 48 kHz of one Opus frame, by TOC configuration number (RFC 6716 §3.1).
cdef int OPUS_FRAME_SAMPLES[32]
OPUS_FRAME_SAMPLES[:] = [
    480, 960, 1920, 2880, 480, 960, 1920, 2880, 480, 960, 1920, 2880,
    480, 960, 480, 960,
    120, 240, 480, 960, 120, 240, 480, 960, 120, 240, 480, 960, 120, 240, 480, 960,
]


class Fallback(Exception):
    """The recording needs the Python passes (damage, or a case this module leaves to them)."""


cdef inline int64_t py_round(double value):
    """Python's ``round()`` of a float: to nearest, ties to even (the default FP mode)."""
    return <int64_t>nearbyint(value)


cdef struct Timestamps:
    # RTP timestamps extended past their 32-bit wrap (``_TimelineBuilder.extended``)
    bint started
    uint32_t last
    int64_t extended


cdef inline int64_t extend_timestamp(Timestamps *state, uint32_t ts) noexcept:
    cdef int64_t delta
    if not state.started:
        state.started = True
        state.extended = ts
    else:
        delta = <int64_t>((ts - state.last) & 0xFFFFFFFF)
        if delta >= 0x80000000:
            delta -= 0x100000000
        state.extended += delta
    state.last = ts
    return state.extended


cdef int opus_samples(const unsigned char *payload, Py_ssize_t length):
    """:func:`melter.depay.opus.packet_samples`; -1 where it raises ``ValueError``."""
    cdef int toc, per_frame, code, count, total
    if length == 0:
        return 0
    toc = payload[0]
    per_frame = OPUS_FRAME_SAMPLES[toc >> 3]
    code = toc & 0x03
    if code == 0:
        return per_frame
    if code == 1 or code == 2:
        return 2 * per_frame
    if length < 2:
        return -1
    count = payload[1] & 0x3F
    if count == 0:
        return -1
    total = count * per_frame
    if total > 5760:
        return -1
    return total


cdef Py_ssize_t vp8_descriptor_size(const unsigned char *data, Py_ssize_t length):
    """Bytes of a VP8 payload descriptor (RFC 7741 §4.2); -1 where it is cut."""
    cdef Py_ssize_t pos
    cdef unsigned char ext
    if length == 0:
        return -1
    if not data[0] & 0x80:
        return 1
    if length < 2:
        return -1
    ext = data[1]
    pos = 2
    if ext & 0x80:
        if length < pos + 1:
            return -1
        if data[pos] & 0x80:
            if length < pos + 2:
                return -1
            pos += 2
        else:
            pos += 1
    if ext & 0x40:
        if length < pos + 1:
            return -1
        pos += 1
    if ext & 0x30:
        if length < pos + 1:
            return -1
        pos += 1
    return pos


cdef class _Pkt:
    """An RTP packet in sending order (``OrderedPacket`` and ``RtpPacket`` in one)."""

    cdef int64_t index
    cdef int64_t offset
    cdef int64_t arrival_us
    cdef int segment
    cdef int seq
    cdef int pt
    cdef bint marker
    cdef uint32_t ts
    cdef uint32_t ssrc
    cdef bytes data
    cdef Py_ssize_t pay_start
    cdef Py_ssize_t pay_end
    cdef Py_ssize_t ext_start
    cdef Py_ssize_t ext_end
    cdef int profile  # -1: no extension block

    cdef inline const unsigned char *bytes_ptr(self):
        return <const unsigned char *>PyBytes_AS_STRING(self.data)


cdef struct Element:
    int ext_id
    Py_ssize_t start
    Py_ssize_t length


cdef int put_element(
    Element *out, int count, int ext_id, Py_ssize_t start, Py_ssize_t length
) except -1:
    """Store one element as a dict would: a repeated id keeps its place and takes the new
    value. Returns the new count."""
    cdef int i
    for i in range(count):
        if out[i].ext_id == ext_id:
            out[i].start = start
            out[i].length = length
            return count
    if count == MAX_ELEMENTS:
        raise Fallback("too many header extension elements")
    out[count].ext_id = ext_id
    out[count].start = start
    out[count].length = length
    return count + 1


cdef int parse_elements(_Pkt pkt, Element *out) except -2:
    """The packet's RFC 8285 elements as :func:`melter.mjr.rtp.parse_extensions` reads them
    (a repeated id keeps its first place and its last value); the count, -1 if cut."""
    cdef const unsigned char *data = pkt.bytes_ptr()
    cdef Py_ssize_t pos = pkt.ext_start
    cdef Py_ssize_t end = pkt.ext_end
    cdef int count = 0
    cdef int ext_id
    cdef Py_ssize_t length
    cdef unsigned char byte
    if pkt.profile == 0xBEDE:
        while pos < end:
            byte = data[pos]
            if byte == 0:
                pos += 1
                continue
            ext_id = byte >> 4
            if ext_id == 15:
                break
            length = (byte & 0x0F) + 1
            if pos + 1 + length > end:
                return -1
            count = put_element(out, count, ext_id, pos + 1, length)
            pos += 1 + length
    elif pkt.profile >= 0 and (pkt.profile & 0xFFF0) == 0x1000:
        while pos < end:
            ext_id = data[pos]
            if ext_id == 0:
                pos += 1
                continue
            if pos + 2 > end:
                return -1
            length = data[pos + 1]
            if pos + 2 + length > end:
                return -1
            count = put_element(out, count, ext_id, pos + 2, length)
            pos += 2 + length
    return count


cdef class _SsrcState:
    cdef int64_t first_seq
    cdef int64_t highest

    cdef inline int64_t relative(self, int seq):
        cdef int64_t highest16 = (self.first_seq + self.highest) & 0xFFFF
        cdef int64_t delta = (seq - highest16) & 0xFFFF
        if delta >= 0x8000:
            delta -= 0x10000
        return self.highest + delta


cdef _SsrcState new_state(int seq):
    cdef _SsrcState state = _SsrcState.__new__(_SsrcState)
    state.first_seq = seq
    state.highest = 0
    return state


cdef class _OrderedSource:
    """:class:`melter.mjr.reader.MjrReader` (MJR00002 frames), RTP parsing and
    :func:`melter.order.ordered_packets` in one: ``fill`` appends released packets to a list."""

    cdef object handle
    cdef bytearray buf  # fixed size: frames are copied out, the buffer is reused
    cdef unsigned char *bufp
    cdef Py_ssize_t pos
    cdef Py_ssize_t n
    cdef int64_t offset  # file offset of buf[pos]
    cdef int64_t end  # stop here (the first pass's end) or -1
    cdef int64_t base_us
    cdef int64_t last_arrival  # the raw u32 value
    cdef int64_t before_last_arrival
    cdef int64_t wraps
    cdef bint eof
    cdef list pending
    # orderer
    cdef int window
    cdef list heap
    cdef set in_heap
    cdef int64_t recent[RECENT_SIZE]
    cdef int recent_count
    cdef int recent_head
    cdef int64_t last_emitted
    cdef int last_segment
    cdef int64_t max_pushed
    cdef int segment
    cdef bint has_ssrc
    cdef uint32_t ssrc
    cdef _SsrcState state  # of the current SSRC
    cdef dict states
    cdef int64_t base
    cdef int64_t counter
    # statistics (OrderStats)
    cdef public int64_t packets, invalid, duplicates, reordered, late, lost
    cdef public int64_t ssrc_changes, seq_restarts, stray_ssrc
    cdef public list ssrcs
    cdef public object cut  # (offset, what) of a last frame cut short, or None

    def __cinit__(self, path, int64_t frames_offset, int64_t base_us, int64_t end):
        self.handle = open(path, "rb", buffering=0)
        self.handle.seek(frames_offset)
        self.buf = bytearray(READ_BUFFER)
        self.bufp = <unsigned char *>PyByteArray_AS_STRING(self.buf)
        self.pos = 0
        self.n = 0
        self.offset = frames_offset
        self.end = end
        self.base_us = base_us
        self.last_arrival = 0
        self.before_last_arrival = 0
        self.wraps = 0
        self.eof = False
        self.pending = []
        self.window = REORDER_WINDOW
        self.heap = []
        self.in_heap = set()
        self.recent_count = 0
        self.recent_head = 0
        self.last_emitted = -1
        self.last_segment = -1
        self.max_pushed = -1
        self.segment = -1
        self.has_ssrc = False
        self.ssrc = 0
        self.state = None
        self.states = {}
        self.base = 0
        self.counter = 0
        self.ssrcs = []
        self.cut = None
        if RECENT_EMITTED != RECENT_SIZE:
            raise Fallback("recent-packet memory differs from melter.order")

    def close(self):
        self.handle.close()

    # -- reading ------------------------------------------------------------------------------
    cdef bint _have(self, Py_ssize_t need) except -1:
        """Whether ``need`` bytes from ``pos`` are in the buffer, reading more if not."""
        cdef Py_ssize_t got
        if self.n - self.pos >= need:
            return True
        memmove(self.bufp, self.bufp + self.pos, self.n - self.pos)
        self.n -= self.pos
        self.pos = 0
        view = memoryview(self.buf)
        while self.n < need:
            got = self.handle.readinto(view[self.n:])
            if not got:
                return False
            self.n += got
        return True

    cdef _Pkt _cut_short(self, str what):
        """The end of a file whose last frame is cut short (a recording Janus is still
        writing, or one a crash cut): the first pass reads up to that frame, as the Python
        reader does; the second pass never reaches it (it stops at the first pass's end)."""
        if self.end >= 0:
            raise Fallback(f"file ends inside {what} at byte {self.offset}")
        self.cut = (self.offset, what)
        return None

    cdef _Pkt _next_frame(self):
        """The next frame's packet, parsed; None at the end of the file."""
        cdef const unsigned char *p
        cdef int64_t arrival
        cdef Py_ssize_t length, pos, start, end
        cdef int b0, cc, words, padding
        cdef _Pkt pkt
        cdef Element elements[MAX_ELEMENTS]
        if self.end >= 0 and self.offset >= self.end:
            return None
        if not self._have(10):
            if self.n - self.pos:
                return self._cut_short("a frame header")
            return None
        p = self.bufp + self.pos
        length = (p[8] << 8) | p[9]
        if memcmp(p, b"MEET", 4) != 0 or length > MAX_RTP_FRAME or length == 0:
            raise Fallback(f"damaged frame at byte {self.offset}")
        arrival = (<int64_t>p[4] << 24) | (p[5] << 16) | (p[6] << 8) | p[7]
        if not self._have(10 + length):
            return self._cut_short(f"a {length}-byte frame")
        p = self.bufp + self.pos
        if (arrival < ARRIVAL_WRAP_WINDOW_MS
                and self.last_arrival >= (<int64_t>1 << 32) - ARRIVAL_WRAP_WINDOW_MS
                and self.before_last_arrival >= (<int64_t>1 << 32) - ARRIVAL_WRAP_WINDOW_MS):
            self.wraps += 1
        self.before_last_arrival = self.last_arrival
        self.last_arrival = arrival
        pkt = _Pkt.__new__(_Pkt)
        pkt.data = PyBytes_FromStringAndSize(<const char *>p + 10, length)
        pkt.offset = self.offset
        pkt.arrival_us = self.base_us + (arrival + (self.wraps << 32)) * 1000
        self.pos += 10 + length
        self.offset += 10 + length
        # RtpPacket.parse
        p = pkt.bytes_ptr()
        if length < 12:
            raise Fallback(f"frame at byte {pkt.offset} is not RTP")
        b0 = p[0]
        if b0 >> 6 != 2:
            raise Fallback(f"frame at byte {pkt.offset} is not RTP")
        pkt.pt = p[1] & 0x7F
        pkt.marker = (p[1] & 0x80) != 0
        pkt.seq = (p[2] << 8) | p[3]
        pkt.ts = (<uint32_t>p[4] << 24) | (p[5] << 16) | (p[6] << 8) | p[7]
        pkt.ssrc = (<uint32_t>p[8] << 24) | (p[9] << 16) | (p[10] << 8) | p[11]
        pos = 12
        cc = b0 & 0x0F
        if cc:
            if pos + 4 * cc > length:
                raise Fallback(f"frame at byte {pkt.offset}: RTP CSRC list is cut")
            pos += 4 * cc
        pkt.profile = -1
        pkt.ext_start = pkt.ext_end = pos
        if b0 & 0x10:
            if pos + 4 > length:
                raise Fallback(f"frame at byte {pkt.offset}: RTP extension header is cut")
            pkt.profile = (p[pos] << 8) | p[pos + 1]
            words = (p[pos + 2] << 8) | p[pos + 3]
            pos += 4
            if pos + 4 * words > length:
                raise Fallback(f"frame at byte {pkt.offset}: RTP extension block is cut")
            pkt.ext_start = pos
            pkt.ext_end = pos + 4 * words
            pos += 4 * words
        end = length
        if b0 & 0x20:
            padding = p[length - 1]
            if padding == 0 or pos + padding > end:
                raise Fallback(f"frame at byte {pkt.offset}: impossible RTP padding")
            end -= padding
        pkt.pay_start = pos
        pkt.pay_end = end
        if pkt.profile >= 0 and parse_elements(pkt, elements) < 0:
            raise Fallback(f"frame at byte {pkt.offset}: header extension element is cut")
        return pkt

    # -- ordering (melter.order) --------------------------------------------------------------
    cdef inline void _emitted(self, int64_t ext, _Pkt item, list out):
        if item.segment == self.last_segment and ext > self.last_emitted + 1:
            self.lost += ext - self.last_emitted - 1
        self.last_emitted = ext
        self.last_segment = item.segment
        self.recent[self.recent_head] = ext
        self.recent_head = (self.recent_head + 1) % RECENT_SIZE
        if self.recent_count < RECENT_SIZE:
            self.recent_count += 1
        out.append(item)

    cdef bint _recently_emitted(self, int64_t ext):
        cdef int i
        for i in range(self.recent_count):
            if self.recent[i] == ext:
                return True
        return False

    cdef void _emit_one(self, list out):
        cdef tuple top = heapq.heappop(self.heap)
        cdef int64_t ext = top[0]
        self.in_heap.discard(ext)
        self._emitted(ext, <_Pkt>top[2], out)

    cdef void _flush(self, list out):
        while self.heap:
            self._emit_one(out)

    cdef void _new_segment(self, uint32_t ssrc, _SsrcState state, bint continuing, list out):
        self._flush(out)
        if self.has_ssrc and ssrc != self.ssrc:
            self.ssrc_changes += 1
        if ssrc not in self.ssrcs:
            self.ssrcs.append(ssrc)
        self.segment += 1
        self.has_ssrc = True
        self.ssrc = ssrc
        self.state = state
        cdef int64_t start = self.last_emitted + 1 + self.window
        self.base = start - (state.highest + 1 if continuing else 0)
        self.max_pushed = self.last_emitted

    cdef void _push(self, _Pkt packet, list out):
        cdef _SsrcState state
        cdef int64_t relative, ext
        if self.has_ssrc and packet.ssrc == self.ssrc:
            state = self.state
            relative = state.relative(packet.seq)
            if abs(relative - state.highest) > SEQ_RESTART:
                self.seq_restarts += 1
                state = new_state(packet.seq)
                self.states[packet.ssrc] = state
                self.has_ssrc = False
                self._new_segment(packet.ssrc, state, False, out)
                relative = 0
        else:
            state = self.states.get(packet.ssrc)
            if state is None:
                state = new_state(packet.seq)
                self.states[packet.ssrc] = state
                self._new_segment(packet.ssrc, state, False, out)
                relative = 0
            else:
                relative = state.relative(packet.seq)
                if relative <= state.highest:
                    self.late += 1
                    return
                self._new_segment(packet.ssrc, state, True, out)
        if relative > state.highest:
            state.highest = relative
        ext = self.base + relative
        if ext <= self.last_emitted or (self.heap and ext in self.in_heap):
            if (self.heap and ext in self.in_heap) or self._recently_emitted(ext):
                self.duplicates += 1
            else:
                self.late += 1
            return
        if ext < self.max_pushed:
            self.reordered += 1
        else:
            self.max_pushed = ext
        self.packets += 1
        packet.index = ext - self.window * (self.segment + 1)
        packet.segment = self.segment
        if ext == self.last_emitted + 1 and not self.heap:
            self._emitted(ext, packet, out)
            return
        self.counter += 1
        heapq.heappush(self.heap, (ext, self.counter, packet))
        self.in_heap.add(ext)
        while self.heap and (
            (<tuple>self.heap[0])[0] == self.last_emitted + 1 or len(self.heap) > self.window
        ):
            self._emit_one(out)

    cdef bint _known(self, uint32_t ssrc):
        return ssrc in self.states

    cdef bint fill(self, list out) except -1:
        """Append the next released packets to ``out``; False once everything was released."""
        cdef _Pkt packet, first
        cdef bint known
        while not out:
            if self.eof:
                return False
            packet = self._next_frame()
            if packet is None:
                self.eof = True
                for item in self.pending:
                    self._push(<_Pkt>item, out)
                self.pending = []
                self._flush(out)
                return bool(out)
            if self.has_ssrc and packet.ssrc == self.ssrc and not self.pending:
                self._push(packet, out)
                continue
            known = not self.has_ssrc or self._known(packet.ssrc)
            if self.pending:
                first = <_Pkt>self.pending[0]
                if packet.ssrc == first.ssrc:
                    self.pending.append(packet)
                    if len(self.pending) >= SSRC_CONFIRM:
                        for item in self.pending:
                            self._push(<_Pkt>item, out)
                        self.pending = []
                    continue
                self.stray_ssrc += len(self.pending)
                self.invalid += len(self.pending)
                self.pending = []
                known = (self.has_ssrc and packet.ssrc == self.ssrc) or self._known(packet.ssrc)
            if known:
                self._push(packet, out)
            else:
                self.pending.append(packet)
        return True

    def store_stats(self, stats):
        stats.packets = self.packets
        stats.invalid = self.invalid
        stats.duplicates = self.duplicates
        stats.reordered = self.reordered
        stats.late = self.late
        stats.lost = self.lost
        stats.ssrcs = list(self.ssrcs)
        stats.ssrc_changes = self.ssrc_changes
        stats.seq_restarts = self.seq_restarts
        stats.stray_ssrc = self.stray_ssrc


cdef class _Locator:
    """:class:`melter.track.PieceLocator` with C arrays: the piece, then the knot of its line."""

    cdef list starts
    cdef list lines  # per piece: (knot times, offsets, factors)
    cdef Py_ssize_t count
    cdef Py_ssize_t position
    cdef bint has_next
    cdef int64_t next_start
    cdef int64_t current_start
    cdef list times
    cdef list offsets
    cdef list factors
    cdef Py_ssize_t knots
    cdef Py_ssize_t knot
    cdef double knot_from
    cdef double next_from
    cdef bint has_next_knot
    cdef double current_offset
    cdef double factor

    def __cinit__(self, analysis):
        self.starts = [piece.first_index for piece in analysis.pieces]
        self.lines = []
        for piece in analysis.pieces:
            line = piece.line()
            self.lines.append((
                [knot[0] for knot in line],
                [knot[1] for knot in line],
                [1.0 + knot[2] for knot in line],
            ))
        self.count = len(self.starts)
        self._settle(0)

    cdef void _settle(self, Py_ssize_t position):
        self.position = position
        self.current_start = self.starts[position]
        self.has_next = position + 1 < self.count
        if self.has_next:
            self.next_start = self.starts[position + 1]
        self.times, self.offsets, self.factors = self.lines[position]
        self.knots = len(self.times)
        self._knot(0)

    cdef void _knot(self, Py_ssize_t knot):
        self.knot = knot
        self.knot_from = self.times[knot]
        self.current_offset = self.offsets[knot]
        self.factor = self.factors[knot]
        self.has_next_knot = knot + 1 < self.knots
        if self.has_next_knot:
            self.next_from = self.times[knot + 1]

    cdef int64_t wall(self, int64_t index, double t) except? -1:
        cdef Py_ssize_t lo, hi, mid
        if index < self.current_start:
            # bisect_right(starts, index) - 1
            lo, hi = 0, self.count
            while lo < hi:
                mid = (lo + hi) // 2
                if index < <int64_t>self.starts[mid]:
                    hi = mid
                else:
                    lo = mid + 1
            self._settle(max(0, lo - 1))
        while self.has_next and self.next_start <= index:
            self._settle(self.position + 1)
        if self.knots > 1:
            if t < self.knot_from and self.knot > 0:
                # bisect_right(times, t) - 1
                lo, hi = 0, self.knots
                while lo < hi:
                    mid = (lo + hi) // 2
                    if t < <double>self.times[mid]:
                        hi = mid
                    else:
                        lo = mid + 1
                self._knot(max(0, lo - 1))
            while self.has_next_knot and self.next_from <= t:
                self._knot(self.knot + 1)
        return py_round(self.current_offset + t * self.factor * 1e6)


cdef class _Census:
    """:class:`melter.track._ExtensionCensus` with a C histogram per element id."""

    cdef dict values  # id -> set of values (at most 16 kept)
    cdef int seen_count[256]
    cdef unsigned char last_value[256][16]
    cdef int last_length[256]
    cdef int64_t hist[256][128]
    cdef unsigned char order[256][128]
    cdef int order_length[256]
    cdef list id_order

    def __cinit__(self):
        self.values = {}
        self.id_order = []
        for i in range(256):
            self.last_length[i] = -1

    cdef void add(self, _Pkt pkt, Element *elements, int count) except *:
        cdef const unsigned char *data = pkt.bytes_ptr()
        cdef int i, ext_id, level
        cdef Py_ssize_t length
        cdef const unsigned char *value
        for i in range(count):
            ext_id = elements[i].ext_id
            value = data + elements[i].start
            length = elements[i].length
            if self.seen_count[ext_id] < 16 and not (
                length <= 16
                and self.last_length[ext_id] == length
                and memcmp(self.last_value[ext_id], value, length) == 0
            ):
                seen = self.values.get(ext_id)
                if seen is None:
                    seen = self.values[ext_id] = set()
                    self.id_order.append(ext_id)
                seen.add(pkt.data[elements[i].start:elements[i].start + length])
                self.seen_count[ext_id] = len(seen)
                if length <= 16:
                    memcpy(self.last_value[ext_id], value, length)
                    self.last_length[ext_id] = length
                else:
                    self.last_length[ext_id] = -1
            if length == 1:
                level = value[0] & 0x7F
                if self.hist[ext_id][level] == 0:
                    self.order[ext_id][self.order_length[ext_id]] = level
                    self.order_length[ext_id] += 1
                self.hist[ext_id][level] += 1

    cdef dict histogram(self, int ext_id):
        cdef dict out = {}
        cdef int i, level
        for i in range(self.order_length[ext_id]):
            level = self.order[ext_id][i]
            out[level] = self.hist[ext_id][level]
        return out

    def store(self, census):
        census.values = {ext_id: self.values[ext_id] for ext_id in self.id_order}
        census.histograms = {
            ext_id: self.histogram(ext_id) for ext_id in range(256) if self.order_length[ext_id]
        }


cdef class _FirstPass:
    """:func:`melter.track._first_pass_python` for Opus and VP8."""

    cdef object analysis
    cdef object facts
    cdef object piece_class
    cdef bint video
    cdef int clock
    cdef int ext_level  # -1: none
    cdef int ext_orient
    # timeline (melter.track._TimelineBuilder)
    cdef Timestamps timestamps
    cdef int64_t first_ts
    cdef list pieces
    cdef set piece_indices
    cdef list pending  # (pkt, t, d)
    cdef double window_start
    cdef bint has_window_min
    cdef double window_min_t
    cdef double window_min_d
    cdef int window_count
    cdef bint has_ref
    cdef double ref
    cdef double last_t
    cdef int segment
    cdef bint has_lowest
    cdef double lowest_t
    cdef double lowest_d
    cdef double early_end
    cdef set outliers
    cdef bint first_checked
    cdef bint has_first_packet
    cdef int64_t first_packet_us
    # consume
    cdef bint has_last_end
    cdef double last_end_t
    cdef int64_t last_index
    cdef int last_segment
    cdef int last_rot  # degrees * 2 + flip; -1: none yet
    cdef list raw_gaps
    cdef list keyframes_t
    cdef list res_t
    cdef list rot_t
    cdef dict piece_starts
    cdef int64_t frames
    cdef int64_t media_us
    cdef int64_t levels[128]
    cdef unsigned char level_order[128]
    cdef int level_order_length
    cdef _Census census
    cdef int max_width
    cdef int max_height
    cdef int last_width
    cdef int last_height
    # video grouping (melter.track._VideoGrouper)
    cdef bint has_group
    cdef uint32_t group_ts
    cdef double group_t
    cdef list group_packets
    cdef bint group_complete
    cdef int64_t group_last_index
    cdef list video_gaps
    cdef bint has_video_last_t
    cdef double video_last_t

    def __cinit__(self, analysis, facts, piece_class, int ext_level, int ext_orient):
        self.analysis = analysis
        self.facts = facts
        self.piece_class = piece_class
        self.video = analysis.header.kind == "video"
        self.clock = analysis.clock_rate
        self.ext_level = ext_level
        self.ext_orient = ext_orient
        self.pieces = analysis.pieces
        self.piece_indices = set()
        self.pending = []
        self.outliers = analysis.outliers
        self.has_first_packet = analysis.header.first_packet_us is not None
        self.first_packet_us = analysis.header.first_packet_us or 0
        self.last_index = -1
        self.last_segment = -1
        self.last_rot = -1
        self.raw_gaps = facts.raw_gaps
        self.keyframes_t = facts.keyframes_t
        self.res_t = facts.res_t
        self.rot_t = facts.rot_t
        self.piece_starts = facts.piece_starts
        self.census = _Census()
        self.group_last_index = -1
        self.video_gaps = []

    # -- timeline -----------------------------------------------------------------------------
    cdef inline int64_t extended(self, uint32_t ts):
        if not self.timestamps.started:
            self.first_ts = ts
        return extend_timestamp(&self.timestamps, ts)

    cdef void _new_piece(self, int64_t index, double t, str reason) except *:
        if self.pieces and self.has_lowest:
            self.pieces[-1].lowest = (self.lowest_t, self.lowest_d)
        self.has_lowest = False
        self.pieces.append(self.piece_class(index, t, reason))
        self.piece_indices.add(index)

    cdef void _envelope(self, double t, double d) except *:
        if not self.has_lowest:
            self.has_lowest = True
            self.lowest_t = t
            self.lowest_d = d
            self.early_end = t + OFFSET_SPAN_S
        elif t < self.early_end and d < self.lowest_d:
            self.lowest_t = t
            self.lowest_d = d
        if not self.has_window_min or t - self.window_start >= ENVELOPE_WINDOW_S:
            self.close_window()
            self.window_start = t
            self.has_window_min = True
            self.window_min_t = t
            self.window_min_d = d
            self.window_count = 0
        elif d < self.window_min_d:
            self.window_min_t = t
            self.window_min_d = d
        self.window_count += 1

    cdef void close_window(self) except *:
        if self.has_window_min and self.window_count >= MIN_WINDOW_PACKETS:
            self.pieces[-1].minima.append((self.window_min_t, self.window_min_d))
        self.has_window_min = False

    cdef inline void _normal(self, double t, double d) except *:
        if not self.has_ref or d < self.ref:
            self.has_ref = True
            self.ref = d
        else:
            self.ref += min(d - self.ref, 0.0005)
        self._envelope(t, d)
        self.last_t = t

    cdef void _resolve(self, list pending, list out) except *:
        cdef double deviation
        cdef _Pkt item
        for entry in pending:
            item = <_Pkt>entry[0]
            deviation = <double>entry[2] - (self.ref if self.has_ref else 0.0)
            damaged = (deviation < -JUMP_TOLERANCE_S or deviation > MAX_DELAY_S
                       or <double>entry[1] < self.last_t - JUMP_TOLERANCE_S)
            if damaged:
                self.outliers.add(item.index)
            out.append((item, entry[1], damaged))

    cdef void _start_piece(self, str reason, list out) except *:
        cdef _Pkt first_item = <_Pkt>self.pending[0][0]
        cdef double first_t = self.pending[0][1]
        self.close_window()
        self._new_piece(first_item.index, first_t, reason)
        pending = self.pending
        self.pending = []
        self.has_ref = True
        self.ref = min(entry[2] for entry in pending)
        for entry in pending:
            self._envelope(entry[1], entry[2])
            self.last_t = entry[1]
            out.append((entry[0], entry[1], False))

    cdef object add(self, _Pkt item, double *t_out):
        """None when just this packet resolves, normally, at ``t_out``; otherwise the list of
        ``(packet, t, outlier)`` resolved (maybe empty), as ``_TimelineBuilder.add``."""
        cdef int64_t ts = self.extended(item.ts)
        cdef double t = <double>(ts - self.first_ts) / self.clock
        cdef double d, moved, spread, low, high
        cdef bint new_ssrc
        cdef list out
        t_out[0] = t
        if not self.pieces:
            self._new_piece(item.index, 0.0, "start")
        new_ssrc = item.segment != self.segment
        self.segment = item.segment
        d = <double>item.arrival_us / 1e6 - t
        if not self.has_ref:
            if not self.first_checked:
                self.first_checked = True
                if (self.has_first_packet and fabs(<double>(item.arrival_us - self.first_packet_us))
                        > MAX_DELAY_S * 1e6):
                    self.outliers.add(item.index)
                    return [(item, t, True)]
            self._normal(t, d)
            return None
        if new_ssrc:
            out = []
            self._resolve(self.pending, out)
            self.pending = []
            self.close_window()
            self._new_piece(item.index, t, "ssrc-change")
            self.ref = d
            self._normal(t, d)
            out.append((item, t, False))
            return out
        moved = fabs(d - self.ref)
        if moved <= JUMP_TOLERANCE_S:
            if not self.pending:
                self._normal(t, d)
                return None
            out = []
            self._resolve(self.pending, out)
            self.pending = []
            self._normal(t, d)
            out.append((item, t, False))
            return out
        self.pending.append((item, t, d))
        low = high = <double>self.pending[0][2]
        for entry in self.pending:
            if <double>entry[2] < low:
                low = entry[2]
            if <double>entry[2] > high:
                high = entry[2]
        spread = high - low
        out = []
        if spread > JUMP_TOLERANCE_S:
            self._resolve(self.pending[:-1], out)
            self.pending = self.pending[-1:]
            return out
        if t - <double>self.pending[0][1] >= JUMP_CONFIRM_S or len(self.pending) >= 200:
            self._start_piece("clock-jump", out)
        return out

    cdef list finish(self):
        cdef list out = []
        if not self.pending:
            return out
        if <double>self.pending[-1][1] - <double>self.pending[0][1] >= JUMP_CONFIRM_S / 2:
            self._start_piece("clock-jump", out)
            return out
        self._resolve(self.pending, out)
        self.pending = []
        return out

    # -- consume ------------------------------------------------------------------------------
    cdef void consume(self, _Pkt item, double t) except *:
        cdef bint same_segment = item.segment == self.last_segment
        cdef int64_t lost = (
            item.index - self.last_index - 1 if self.last_index >= 0 and same_segment else 0
        )
        cdef bint starts_piece = item.index in self.piece_indices
        cdef int samples, rotation, i, count
        cdef double gap, duration
        cdef Element elements[MAX_ELEMENTS]
        cdef const unsigned char *data = item.bytes_ptr()
        if (self.has_last_end and same_segment and t < self.last_end_t - JUMP_TOLERANCE_S
                and not starts_piece):
            self.outliers.add(item.index)
            return
        if starts_piece and self.has_last_end:
            self.piece_starts[item.index] = (self.last_index, self.last_end_t)
        self.last_index = item.index
        self.last_segment = item.segment
        count = parse_elements(item, elements) if item.profile >= 0 else 0
        if not self.video:
            samples = opus_samples(data + item.pay_start, item.pay_end - item.pay_start)
            if samples < 0:
                samples = 0
            if self.has_last_end and not starts_piece:
                gap = t - self.last_end_t
                if gap > 0.0025 and (gap > 0.015 or lost):
                    self.raw_gaps.append(
                        (item.index, self.last_end_t, gap, "loss" if lost else "pause", lost)
                    )
            duration = samples / 48000.0
            self.media_us += py_round(duration * 1e6)
            if not self.has_last_end or not same_segment or starts_piece:
                self.last_end_t = t + duration
            elif t + duration > self.last_end_t:
                self.last_end_t = t + duration
            self.has_last_end = True
            self.frames += 1
            if self.ext_level >= 0:
                for i in range(count):
                    if elements[i].ext_id == self.ext_level:
                        if elements[i].length == 0:
                            break  # no value: says nothing
                        level = data[elements[i].start] & 0x7F
                        if self.levels[level] == 0:
                            self.level_order[self.level_order_length] = level
                            self.level_order_length += 1
                        self.levels[level] += 1
                        break
        else:
            self._group(item, t)
            self.has_last_end = True
            self.last_end_t = t
            if self.ext_orient >= 0:
                for i in range(count):
                    if elements[i].ext_id == self.ext_orient:
                        if elements[i].length == 0:
                            break  # no value: says nothing
                        byte = data[elements[i].start]
                        rotation = (byte & 0x03) * 180 + ((byte & 0x04) != 0)
                        if rotation != self.last_rot:
                            self.rot_t.append(
                                (item.index, t, (byte & 0x03) * 90, (byte & 0x04) != 0)
                            )
                            self.last_rot = rotation
                        break

    cdef void census_add(self, _Pkt item) except *:
        cdef Element elements[MAX_ELEMENTS]
        cdef int count
        if item.profile < 0:
            return
        count = parse_elements(item, elements)
        if count:
            self.census.add(item, elements, count)

    # -- video (melter.track._VideoGrouper, _scan_picture) ------------------------------------
    cdef void _group(self, _Pkt item, double t) except *:
        cdef int64_t lost = item.index - self.group_last_index - 1 if self.group_last_index >= 0 else 0
        self.group_last_index = item.index
        if self.has_group and item.ts == self.group_ts:
            if lost:
                self.group_complete = False
            self.group_packets.append(item)
            return
        if self.has_group:
            if lost and not (<_Pkt>self.group_packets[-1]).marker:
                self.group_complete = False
            self._scan_picture()
            if self.has_video_last_t and t - self.video_last_t > VIDEO_GAP_S:
                self.video_gaps.append(
                    (item.index, self.video_last_t, t - self.video_last_t,
                     "loss" if lost else "pause", lost)
                )
        self.has_video_last_t = True
        self.video_last_t = t
        self.has_group = True
        self.group_ts = item.ts
        self.group_t = t
        self.group_packets = [item]
        self.group_complete = not lost

    cdef void _scan_picture(self) except *:
        cdef _Pkt first = <_Pkt>self.group_packets[0]
        cdef const unsigned char *payload = first.bytes_ptr() + first.pay_start
        cdef Py_ssize_t length = first.pay_end - first.pay_start
        cdef Py_ssize_t size
        cdef const unsigned char *frame
        cdef int width, height
        self.frames += 1
        size = vp8_descriptor_size(payload, length)
        if size < 0:
            return
        if not (payload[0] & 0x10 and (payload[0] & 0x07) == 0):
            return
        frame = payload + size
        length -= size
        if length < 3 or frame[0] & 0x01:
            return
        self.keyframes_t.append((first.index, self.group_t))
        if length < 10 or memcmp(frame + 3, b"\x9d\x01\x2a", 3) != 0:
            return
        width = (frame[6] | (frame[7] << 8)) & 0x3FFF
        height = (frame[8] | (frame[9] << 8)) & 0x3FFF
        if width and height:
            self.max_width = max(self.max_width, width)
            self.max_height = max(self.max_height, height)
            if not self.res_t or self.last_width != width or self.last_height != height:
                self.res_t.append((first.index, self.group_t, width, height))
                self.last_width = width
                self.last_height = height

    # -- the pass -----------------------------------------------------------------------------
    cdef void take(self, object resolved, _Pkt item, double t) except *:
        if resolved is None:
            self.consume(item, t)
            return
        for entry in <list>resolved:
            if not entry[2]:
                self.consume(<_Pkt>entry[0], entry[1])

    def run(self, _OrderedSource source):
        cdef list out = []
        cdef _Pkt item
        cdef double t
        cdef bint any_packet = False
        analysis = self.analysis
        while source.fill(out):
            for entry in out:
                item = <_Pkt>entry
                any_packet = True
                self.census_add(item)
                resolved = self.add(item, &t)
                self.take(resolved, item, t)
            out.clear()
        if not any_packet:
            raise Fallback("no valid RTP packets")
        self.take(self.finish(), None, 0.0)
        if self.video:
            if self.has_group:
                if not (<_Pkt>self.group_packets[-1]).marker:
                    self.group_complete = False
                self._scan_picture()
                self.has_group = False
            self.raw_gaps.extend(self.video_gaps)
            self.has_last_end = self.has_video_last_t
            self.last_end_t = self.video_last_t
        self.close_window()
        if self.pieces and self.has_lowest:
            self.pieces[-1].lowest = (self.lowest_t, self.lowest_d)
        analysis.first_ts = self.first_ts
        analysis.frames = self.frames
        analysis.media_us = self.media_us
        analysis.max_width = self.max_width
        analysis.max_height = self.max_height
        analysis.levels = {
            self.level_order[i]: self.levels[self.level_order[i]]
            for i in range(self.level_order_length)
        }
        self.census.store(self.facts.census)
        source.store_stats(analysis.stats)
        facts = self.facts
        facts.last_end_t = self.last_end_t if self.has_last_end else None
        facts.last_index = self.last_index


def first_pass(analysis, facts, piece_class, ext_level, ext_orient):
    """Fill ``analysis`` (fresh) and ``facts`` as the Python first pass does; raise
    :class:`Fallback` for anything left to it. Where the file ends inside its last frame,
    (that frame's offset, what was cut), as :class:`melter.mjr.reader.MjrReader` says it;
    else None."""
    header = analysis.header
    base_us = header.first_packet_us or header.created_us or 0
    source = _OrderedSource(analysis.path, header.frames_offset, base_us, -1)
    try:
        runner = _FirstPass(
            analysis, facts, piece_class,
            -1 if ext_level is None else ext_level,
            -1 if ext_orient is None else ext_orient,
        )
        runner.run(source)
        analysis.compiled_end = source.offset
        return source.cut
    finally:
        source.close()


def timed_frames(analysis, frame_class):
    """:func:`melter.track._timed_frames_python` for a recording the first pass took."""
    header = analysis.header
    base_us = header.first_packet_us or header.created_us or 0
    source = _OrderedSource(analysis.path, header.frames_offset, base_us, analysis.compiled_end)
    try:
        if header.kind == "video":
            yield from _video_frames(analysis, frame_class, source)
        else:
            yield from _audio_frames(analysis, frame_class, source)
    except Fallback as exc:
        # The first pass read these bytes whole: they changed on disk since.
        raise InputError(analysis.path, f"recording changed while being read ({exc})") from None
    finally:
        source.close()


cdef int element_byte(_Pkt item, int ext_id) except -3:
    """The first byte of the packet's element ``ext_id``: -1 if absent, -2 if empty."""
    cdef Element elements[MAX_ELEMENTS]
    cdef int count, i
    if item.profile < 0:
        return -1
    count = parse_elements(item, elements)
    for i in range(count):
        if elements[i].ext_id == ext_id:
            if elements[i].length == 0:
                return -2
            return item.bytes_ptr()[elements[i].start]
    return -1


def _audio_frames(analysis, frame_class, _OrderedSource source):
    cdef _Locator locate = _Locator(analysis)
    cdef list out = []
    cdef _Pkt item
    cdef Timestamps timestamps = Timestamps(False, 0, 0)
    cdef int64_t ts_ext = 0, first_ts = analysis.first_ts
    cdef double clock = analysis.clock_rate
    cdef int level_id = -1 if analysis.audio_level_id is None else analysis.audio_level_id
    cdef int samples, value
    cdef const unsigned char *data
    cdef set outliers = analysis.outliers
    cdef bint check_outliers = bool(outliers)
    while source.fill(out):
        for entry in out:
            item = <_Pkt>entry
            ts_ext = extend_timestamp(&timestamps, item.ts)
            if check_outliers and item.index in outliers:
                continue
            data = item.bytes_ptr()
            samples = opus_samples(data + item.pay_start, item.pay_end - item.pay_start)
            if samples < 0:
                continue
            level = None
            if level_id >= 0:
                value = element_byte(item, level_id)
                if value >= 0:
                    level = value & 0x7F
            yield frame_class(
                locate.wall(item.index, (ts_ext - first_ts) / clock),
                item.data[item.pay_start:item.pay_end],
                samples,
                False,
                None,
                None,
                level,
            )
        out.clear()


def _video_frames(analysis, frame_class, _OrderedSource source):
    cdef _Locator locate = _Locator(analysis)
    cdef list out = []
    cdef _Pkt item, first
    cdef Timestamps timestamps = Timestamps(False, 0, 0)
    cdef int64_t ts_ext = 0, first_ts = analysis.first_ts
    cdef double clock = analysis.clock_rate
    cdef set outliers = analysis.outliers
    cdef bint check_outliers = bool(outliers)
    cdef bint has_group = False, complete = False, need_keyframe = True
    cdef uint32_t group_ts = 0
    cdef double group_t = 0.0, t
    cdef list packets = None
    cdef int64_t last_index = -1, lost
    cdef int64_t dropped = 0, dropped_before_first = 0
    cdef bint any_keyframe = bool(analysis.keyframes_us)
    cdef bint done = False
    while not done:
        if not source.fill(out):
            done = True
            if not timestamps.started:
                break
            out = [None]
        for entry in out:
            if entry is not None:
                item = <_Pkt>entry
                ts_ext = extend_timestamp(&timestamps, item.ts)
                if check_outliers and item.index in outliers:
                    continue
                t = (ts_ext - first_ts) / clock
                lost = item.index - last_index - 1 if last_index >= 0 else 0
                last_index = item.index
                if has_group and item.ts == group_ts:
                    if lost:
                        complete = False
                    packets.append(item)
                    continue
                if has_group and lost and not (<_Pkt>packets[-1]).marker:
                    complete = False
            elif has_group and not (<_Pkt>packets[-1]).marker:
                complete = False
            if has_group:
                picture = _vp8_picture(packets)
                if picture is None or not complete:
                    need_keyframe = True
                    dropped += 1
                elif need_keyframe and not picture[1]:
                    if any_keyframe and dropped == dropped_before_first:
                        dropped_before_first += 1
                    dropped += 1
                else:
                    need_keyframe = False
                    first = <_Pkt>packets[0]
                    yield frame_class(
                        locate.wall(first.index, group_t),
                        picture[0],
                        0,
                        picture[1],
                        picture[2],
                        picture[3],
                    )
            if entry is None:
                has_group = False
                break
            has_group = True
            group_ts = item.ts
            group_t = t
            packets = [item]
            complete = not lost
        out.clear()
    if dropped:
        analysis.warnings.append(
            f"{analysis.path}: left out {dropped} pictures that could not decode cleanly "
            f"({dropped_before_first} before the first key frame, the rest after lost packets "
            "until the next key frame)"
        )


cdef object _vp8_picture(list packets):
    """:meth:`melter.depay.vp8.Vp8Depacketizer.assemble`: ``(data, keyframe, width, height)``,
    None where it raises ``ValueError``."""
    cdef _Pkt first = <_Pkt>packets[0]
    cdef _Pkt pkt
    cdef const unsigned char *payload = first.bytes_ptr() + first.pay_start
    cdef Py_ssize_t length = first.pay_end - first.pay_start
    cdef Py_ssize_t size, total = 0
    cdef const unsigned char *frame
    cdef bytes data
    cdef char *target
    size = vp8_descriptor_size(payload, length)
    if size < 0:
        return None
    if not (payload[0] & 0x10 and (payload[0] & 0x07) == 0):
        return None
    if len(packets) == 1:
        data = first.data[first.pay_start + size:first.pay_end]
    else:
        for entry in packets:
            pkt = <_Pkt>entry
            size = vp8_descriptor_size(
                pkt.bytes_ptr() + pkt.pay_start, pkt.pay_end - pkt.pay_start
            )
            if size < 0:
                return None
            total += pkt.pay_end - pkt.pay_start - size
        data = PyBytes_FromStringAndSize(NULL, total)
        target = PyBytes_AS_STRING(data)
        for entry in packets:
            pkt = <_Pkt>entry
            payload = pkt.bytes_ptr() + pkt.pay_start
            length = pkt.pay_end - pkt.pay_start
            size = vp8_descriptor_size(payload, length)
            memcpy(target, payload + size, length - size)
            target += length - size
    frame = <const unsigned char *>PyBytes_AS_STRING(data)
    length = PyBytes_GET_SIZE(data)
    if length < 3 or frame[0] & 0x01:
        return data, False, None, None
    if length < 10 or memcmp(frame + 3, b"\x9d\x01\x2a", 3) != 0:
        return data, True, None, None
    return (
        data,
        True,
        (frame[6] | (frame[7] << 8)) & 0x3FFF,
        (frame[8] | (frame[9] << 8)) & 0x3FFF,
    )
