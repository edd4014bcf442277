"""Property tests of ordering and timing against generated truth.

Each example builds an Opus-like stream (20 ms packets; payloads are tiny CELT frames, as only
their TOC matters here), applies random edits whose effect is known exactly — reordering within
a window, duplicates, drops, pauses, wraps, timestamp jumps, SSRC changes — and checks
``ordered_packets`` and ``analyze`` against that truth.

The track's first packet always arrives first and is never lost: it is the reference every
recording is measured from (a reordered first packet is a separate, known case in
test_mjr_edge_cases.py).
"""

from __future__ import annotations

import itertools
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from melter.mjr.reader import MjrReader
from melter.order import OrderStats, ordered_packets
from melter.track import analyze
from tests.helpers.mjrwriter import T0_US, Stream

PACKET_US = 20_000
TICKS = 960
SSRC_A = 0x0A0A0A0A
SSRC_B = 0x0B0B0B0B
#: Payload: CELT fullband 20 ms TOC and two bytes (what a DTX sender emits; 960 samples).
PAYLOAD = bytes((0xF8, 0xFF, 0xFE))

PROPERTY = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
    database=None,
)

pytestmark = pytest.mark.timeout(120)


@contextmanager
def recording(stream: Stream) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as folder:
        yield stream.write(Path(folder) / "prop.mjr")


def ordered(path: Path) -> tuple[list[int], list[int], OrderStats]:
    stats = OrderStats()
    items = list(ordered_packets(MjrReader(path), stats))
    return [i.packet.sequence_number for i in items], [i.index for i in items], stats


def reordered_count(arrival_indices: list[int]) -> int:
    """Packets that arrive after a later-sent packet (each first copy only)."""
    seen: set[int] = set()
    highest = -1
    count = 0
    for index in arrival_indices:
        if index in seen:
            continue
        seen.add(index)
        if index < highest:
            count += 1
        highest = max(highest, index)
    return count


@dataclass
class Scenario:
    count: int
    seq: int
    ts: int
    window: int
    shuffle_seed: int
    drops: set[int] = field(default_factory=set)
    duplicates: list[tuple[int, int]] = field(default_factory=list)
    pauses: dict[int, int] = field(default_factory=dict)  # before packet -> length in ms

    def build(self) -> Stream:
        stream = Stream.audio([PAYLOAD] * self.count, TICKS, seq=self.seq, ts=self.ts)
        # pauses from the last so the shifts stay on the right packets
        for at, length_ms in sorted(self.pauses.items(), reverse=True):
            stream.pause(at, length_ms / 1000)
        stream.drop(*self.drops)
        if self.window > 1:
            stream.shuffle(random.Random(self.shuffle_seed), self.window)
        for index, later in self.duplicates:
            if index not in self.drops:
                stream.duplicate(index, later)
        return stream

    @property
    def kept(self) -> list[int]:
        return [i for i in range(self.count) if i not in self.drops]

    def expected_gaps(self) -> list[tuple[int, int, str, int]]:
        """``(start µs after T0, length µs, cause, packets lost)`` between kept packets."""
        gaps = []
        kept = self.kept
        shift = {i: sum(v for k, v in self.pauses.items() if k <= i) * 1000 for i in kept}
        for before, after in itertools.pairwise(kept):
            lost = after - before - 1
            paused = shift[after] - shift[before]
            length = lost * PACKET_US + paused
            if length:
                start = (before + 1) * PACKET_US + shift[before]
                gaps.append((start, length, "loss" if lost else "pause", lost))
        return gaps

    def expected_end_us(self) -> int:
        last = self.count - 1
        return (last + 1) * PACKET_US + sum(self.pauses.values()) * 1000


@st.composite
def scenarios(draw: st.DrawFn, pauses: bool = False) -> Scenario:
    count = draw(st.integers(20, 260))
    seq = draw(st.one_of(st.integers(0, 0xFFFF), st.integers(0xFFFF - count, 0xFFFF)))
    ts = draw(
        st.one_of(
            st.integers(0, 0xFFFF_FFFF),
            st.integers(0xFFFF_FFFF - count * TICKS, 0xFFFF_FFFF),
        )
    )
    window = draw(st.integers(1, 12))
    interior = st.integers(1, count - 2)
    drops = draw(st.sets(interior, max_size=count // 5))
    duplicates = draw(
        st.lists(st.tuples(st.integers(0, count - 1), st.integers(0, 15)), max_size=8)
    )
    pause_map: dict[int, int] = {}
    if pauses:
        pause_map = draw(st.dictionaries(interior, st.integers(100, 3000), max_size=4))
    return Scenario(
        count, seq, ts, window, draw(st.integers(0, 2**32)), drops, duplicates, pause_map
    )


@PROPERTY
@given(scenarios())
def test_order_restored_minus_drops(scenario: Scenario) -> None:
    stream = scenario.build()
    arrival = [p.index for p in stream.packets]
    with recording(stream) as path:
        seqs, indices, stats = ordered(path)
    kept = scenario.kept
    assert indices == kept
    assert seqs == [(scenario.seq + i) & 0xFFFF for i in kept]
    assert stats.packets == len(kept)
    assert stats.duplicates == len(arrival) - len(kept)
    assert stats.lost == len(scenario.drops)
    assert stats.reordered == reordered_count(arrival)
    assert (stats.late, stats.invalid, stats.ssrc_changes, stats.seq_restarts) == (0, 0, 0, 0)


@PROPERTY
@given(scenarios(pauses=True))
def test_durations_and_gaps_match_truth(scenario: Scenario) -> None:
    stream = scenario.build()
    with recording(stream) as path:
        analysis = analyze(path)
    assert len(analysis.pieces) == 1
    assert abs(analysis.start_us - T0_US) <= 1
    assert abs(analysis.end_us - (T0_US + scenario.expected_end_us())) <= 1
    assert analysis.media_us == len(scenario.kept) * PACKET_US
    assert analysis.frames == len(scenario.kept)
    got = [(g.start_us - T0_US, g.length_us, g.cause, g.packets_lost) for g in analysis.gaps]
    expected = scenario.expected_gaps()
    assert len(got) == len(expected)
    for (g_start, g_len, g_cause, g_lost), (e_start, e_len, e_cause, e_lost) in zip(
        got, expected, strict=True
    ):
        assert abs(g_start - e_start) <= 1 and abs(g_len - e_len) <= 1
        assert (g_cause, g_lost) == (e_cause, e_lost)


@PROPERTY
@given(
    count=st.integers(120, 300),
    at=st.integers(20, 100),
    jump=st.one_of(
        st.integers(TICKS * 50, 48000 * 86400), st.integers(-48000 * 86400, -TICKS * 50)
    ),
    seq=st.integers(0, 0xFFFF),
    ts=st.integers(0, 0xFFFF_FFFF),
    jitter_seed=st.integers(0, 1000),
)
def test_timestamp_jump_keeps_wall_clock(
    count: int, at: int, jump: int, seq: int, ts: int, jitter_seed: int
) -> None:
    """A jump of ±1 s .. 1 day in RTP time (arrivals continue) leaves the wall-clock span."""
    stream = Stream.audio([PAYLOAD] * count, TICKS, seq=seq, ts=ts).ts_jump(at, jump)
    stream.jitter(random.Random(jitter_seed), 5)
    with recording(stream) as path:
        analysis = analyze(path)
        _, indices, stats = ordered(path)
    assert indices == list(range(count))
    assert stats.lost == 0
    assert [p.first_index for p in analysis.pieces] == [0, at]
    # the jitter delays packets by up to 5 ms, the ms arrival stamps truncate up to 1 ms
    assert -1000 <= analysis.start_us - T0_US <= 5000
    assert abs(analysis.duration_us - count * PACKET_US) <= 6000
    assert analysis.media_us == count * PACKET_US


@PROPERTY
@given(
    count=st.integers(40, 200),
    at=st.integers(1, 39),
    seq=st.integers(0, 0xFFFF),
    new_seq=st.integers(0, 0xFFFF),
    # None: Janus keeps the clock running; else the new sender's clock is off by 1 s .. 1 day
    # (smaller offsets are a known bug, see test_mjr_edge_cases.py)
    ts_offset=st.one_of(
        st.none(),
        st.integers(48000, 48000 * 86400),
        st.integers(-48000 * 86400, -48000),
    ),
    window=st.integers(1, 6),
    shuffle_seed=st.integers(0, 1000),
)
def test_ssrc_change_keeps_both_senders(
    count: int,
    at: int,
    seq: int,
    new_seq: int,
    ts_offset: int | None,
    window: int,
    shuffle_seed: int,
) -> None:
    """Reordering stays within each sender's packets (a sender switch is not a reordering)."""
    stream = Stream.audio([PAYLOAD] * count, TICKS, seq=seq, ts=0, ssrc=SSRC_A)
    new_ts = None if ts_offset is None else (at * TICKS + ts_offset) & 0xFFFF_FFFF
    stream.ssrc_change(at, SSRC_B, seq=new_seq, ts=new_ts)
    if window > 1:
        rng = random.Random(shuffle_seed)
        first = stream.packets[:at]
        second = stream.packets[at:]
        keys_a = [i + rng.uniform(0, window) if i else 0.0 for i in range(len(first))]
        keys_b = [i + rng.uniform(0, window) if i else 0.0 for i in range(len(second))]
        order = sorted(range(len(first)), key=keys_a.__getitem__)
        order += [len(first) + i for i in sorted(range(len(second)), key=keys_b.__getitem__)]
        stream.permute(order)
    with recording(stream) as path:
        seqs, indices, stats = ordered(path)
        analysis = analyze(path)
    assert indices == list(range(count))
    expected = [(seq + i) & 0xFFFF for i in range(at)]
    expected += [(new_seq + i) & 0xFFFF for i in range(count - at)]
    assert seqs == expected
    assert (stats.ssrcs, stats.ssrc_changes, stats.late, stats.lost) == (
        [SSRC_A, SSRC_B],
        1,
        0,
        0,
    )
    assert analysis.frames == count
    assert abs(analysis.duration_us - count * PACKET_US) <= 1000
