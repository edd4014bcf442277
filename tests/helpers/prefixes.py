"""Recordings as they stood while Janus was still writing them.

Janus appends each packet to its file as the packet arrives, so a recording read before the
meeting ends is a byte prefix of the final file: the header and every frame that arrived up to
then, perhaps followed by the first bytes of the next frame (a buffered writer flushes at any
byte). :func:`cut_at` writes such a prefix for a chosen arrival time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from melter.mjr.reader import MjrReader


@dataclass(frozen=True)
class Arrivals:
    """Where each frame of a recording starts and when it arrived (µs on the Janus host)."""

    size: int
    frames_offset: int
    offsets: list[int]
    arrivals_us: list[int]

    @property
    def first_us(self) -> int:
        return self.arrivals_us[0]

    @property
    def last_us(self) -> int:
        return self.arrivals_us[-1]


def arrivals(path: Path) -> Arrivals:
    """The frames of an MJR00002 recording with their arrival times."""
    reader = MjrReader(path)
    base = reader.header.first_packet_us or reader.header.created_us or 0
    offsets, times = [], []
    for frame in reader.frames():
        assert frame.arrival_ms is not None, f"{path}: no arrival times (not MJR00002)"
        offsets.append(frame.offset)
        times.append(base + frame.arrival_ms * 1000)
    return Arrivals(path.stat().st_size, reader.header.frames_offset, offsets, times)


@dataclass(frozen=True)
class Prefix:
    """A prefix written by :func:`cut_at`: its file and the arrival of its last whole frame."""

    path: Path
    end_us: int
    frames: int


def cut_at(source: Path, at_us: int, target: Path, partial: int = 0,
           known: Arrivals | None = None) -> Prefix | None:
    """``source`` as it stood when the frames arrived up to ``at_us`` had been written, plus
    ``partial`` bytes of the next frame (a write caught half done). None when no frame had
    arrived yet (Janus writes the header with the first packet)."""
    facts = known or arrivals(source)
    count = 0
    while count < len(facts.arrivals_us) and facts.arrivals_us[count] <= at_us:
        count += 1
    if count == 0:
        return None
    end = facts.offsets[count] if count < len(facts.offsets) else facts.size
    data = source.read_bytes()
    extra = 0 if count == len(facts.offsets) else min(partial, end_of(facts, count) - end - 1)
    target.write_bytes(data[: end + max(0, extra)])
    return Prefix(target, facts.arrivals_us[count - 1], count)


def end_of(facts: Arrivals, index: int) -> int:
    """Where frame ``index`` ends (the next frame's start, or the file's end)."""
    return facts.offsets[index + 1] if index + 1 < len(facts.offsets) else facts.size


def cut_meeting(finished: Path, live: Path, at_us: int) -> None:
    """Make ``live`` the meeting folder ``finished`` as Janus had written it at ``at_us``
    (its ``meeting.yaml`` and each recording's prefix, a partly written frame at the end);
    an earlier cut is overwritten."""
    live.mkdir(parents=True, exist_ok=True)
    (live / "meeting.yaml").write_bytes((finished / "meeting.yaml").read_bytes())
    for recording in sorted(finished.glob("*.mjr")):
        assert cut_at(recording, at_us, live / recording.name, partial=7) is not None


def finish_meeting(finished: Path, live: Path) -> None:
    """Let ``live``'s recordings grow, in place, to their whole length (the meeting ends)."""
    for recording in sorted(finished.glob("*.mjr")):
        with (live / recording.name).open("r+b") as grown:
            grown.write(recording.read_bytes())
