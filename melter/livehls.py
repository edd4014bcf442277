"""An HLS EVENT playlist that grows while a meeting goes on, from its finished chunks.

A meeting rendered in chunks while it goes on (prerenders, see :mod:`melter.farm.runner`)
has, at any time, a run of finished chunks from its start: each chunk's video as an MP4 (a
fresh encode that starts on a key frame, with a key frame every segment length) and its
audio as AAC packets on the meeting's packet grid (:mod:`melter.splice`). Those packets are
copied, as they are, into MPEG-TS segments on a fixed grid of the meeting's time: segment
``s`` holds the frames ``s * G`` to ``(s + 1) * G - 1`` (``G`` frames a segment) and the
audio packets that start in the same stretch. Segments never span two chunks (chunks are cut
on the segment grid), so every segment can be written as soon as its chunk is finished, and
never changes afterwards, as an EVENT playlist requires: a playlist only ever gains segments
at its end. The render after the meeting replaces the whole playlist with a VOD one.

Timestamps are the meeting's own, 1.4 s later (see :data:`_SHIFT`): a player reading the
segments one after the other sees one continuous stream.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from melter.errors import MelterError
from melter.hls import segment_name
from melter.splice import FRAME, audio_packets

#: MPEG-TS timestamps are counted at 90 kHz.
TS_RATE = 90_000
#: Every timestamp is moved this much later (as FFmpeg's own MPEG-TS output starts): the
#: audio's priming packet and the first pictures' decoding times lie before the meeting's
#: start, and a segment must not begin with a negative time (the muxer would move that
#: segment alone, and the next one would then start before it ended).
_SHIFT = Fraction(7, 5)


@dataclass(frozen=True)
class LiveChunk:
    """A finished chunk: its video (MP4) holding frames ``first`` to ``last`` of the meeting,
    and its audio piece (AAC packets of :func:`melter.splice.encode_stretch`) whose first
    packet starts at sample ``audio_start`` of the meeting
    (:func:`melter.splice.first_packet`)."""

    video: Path
    audio: Path
    first: int
    last: int
    audio_start: int


@dataclass(frozen=True)
class _Packet:
    dts: int
    pts: int
    data: bytes
    keyframe: bool
    frame: int | None  # the meeting's frame it shows (None: an audio packet)

    @property
    def video(self) -> bool:
        return self.frame is not None


def segment_frames(fps: int, seconds: int) -> int:
    return fps * seconds


def closed_segments(chunks: Sequence[LiveChunk], fps: int, seconds: int) -> int:
    """How many segments from the meeting's start lie whole before the end of a run of
    chunks (the run from the meeting's start, or one that goes on from segments written)."""
    if not chunks:
        return 0
    return (chunks[-1].last + 1) // segment_frames(fps, seconds)


def _ticks(seconds: Fraction) -> int:
    return math.floor((seconds + _SHIFT) * TS_RATE + Fraction(1, 2))


def _video(chunk: LiveChunk, fps: int) -> Iterator[_Packet]:
    with av.open(str(chunk.video)) as container:
        stream = container.streams.video[0]
        base = stream.time_base
        if base is None:
            raise MelterError(f"{chunk.video.name}: a video stream without a time base")
        start = Fraction(chunk.first, fps)
        for packet in container.demux(stream):
            if packet.pts is None or packet.dts is None:
                continue
            yield _Packet(_ticks(start + packet.dts * base), _ticks(start + packet.pts * base),
                          bytes(packet), bool(packet.is_keyframe),
                          chunk.first + round(packet.pts * base * fps))


def write_segments(chunks: Sequence[LiveChunk], fps: int, seconds: int, start: int, stop: int,
                   folder: Path, stem: str, *, rate: int = 48_000) -> list[tuple[str, float]]:
    """Write segments ``start`` to ``stop - 1`` (each ``seconds`` long) into ``folder`` as
    ``<stem>-NNNNN.ts`` from a run of consecutive finished ``chunks`` that holds them (the
    chunks from the one segment ``start`` lies in are enough: a meeting's live playlist
    reads only what it adds); their names and durations. Every segment needs its chunk
    finished: ``stop`` at most :func:`closed_segments`."""
    size = segment_frames(fps, seconds)
    if start == stop:
        return []
    if not (chunks and chunks[0].first <= start * size
            and start <= stop <= closed_segments(chunks, fps, seconds)):
        raise MelterError(f"segments {start}-{stop - 1} are not all in the finished chunks")
    for chunk in chunks:
        if chunk.first % size:
            raise MelterError(f"chunk at frame {chunk.first} is not on the {seconds} s grid")
    audio_by_segment: dict[int, list[_Packet]] = {}
    for sample, data in audio_packets([chunk.audio for chunk in chunks], rate,
                                      chunks[0].audio_start):
        index = max(0, sample * fps // (rate * size))
        if start <= index < stop:
            at = _ticks(Fraction(sample, rate))
            audio_by_segment.setdefault(index, []).append(_Packet(at, at, data, True, None))
    written: list[tuple[str, float]] = []
    with av.open(str(chunks[0].video)) as vsource, av.open(str(chunks[0].audio)) as asource:
        templates = (vsource.streams.video[0], asource.streams.audio[0])
        for chunk in chunks:
            first, last = chunk.first // size, (chunk.last + 1) // size
            if last <= start or first >= stop:
                continue
            video_by_segment: dict[int, list[_Packet]] = {}
            for packet in _video(chunk, fps):
                assert packet.frame is not None
                video_by_segment.setdefault(packet.frame // size, []).append(packet)
            for index in range(max(first, start), min(last, stop)):
                video = video_by_segment.get(index, [])
                if not video or not video[0].keyframe:
                    raise MelterError(f"{chunk.video.name}: segment {index} does not start "
                                      f"on a key frame")
                name = segment_name(stem, index)
                _mux(folder / name, templates, video, audio_by_segment.get(index, []), rate)
                written.append((name, len(video) / fps))
    return written


def _mux(target: Path, templates: tuple[av.video.stream.VideoStream,
                                       av.audio.stream.AudioStream],
         video: list[_Packet], audio: list[_Packet], rate: int) -> None:
    packets = sorted(video + audio, key=lambda p: (p.dts, not p.video))
    tick = Fraction(1, TS_RATE)
    with av.open(str(target), "w", format="mpegts") as out:
        vout = out.add_stream_from_template(templates[0])
        aout = out.add_stream_from_template(templates[1])
        for item in packets:
            packet = av.Packet(item.data)
            packet.stream = vout if item.video else aout
            packet.time_base = tick
            packet.pts, packet.dts = item.pts, item.dts
            if item.video:
                packet.is_keyframe = item.keyframe
            else:
                packet.duration = round(Fraction(FRAME, rate) * TS_RATE)
            out.mux(packet)


def event_playlist(segments: Sequence[tuple[str, float]], seconds: int) -> str:
    """An EVENT playlist of ``segments`` (name, seconds), open for more."""
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", f"#EXT-X-TARGETDURATION:{seconds}",
             "#EXT-X-MEDIA-SEQUENCE:0", "#EXT-X-PLAYLIST-TYPE:EVENT",
             "#EXT-X-INDEPENDENT-SEGMENTS"]
    for name, length in segments:
        lines += [f"#EXTINF:{length:.6f},", name]
    return "\n".join(lines) + "\n"


__all__ = ["LiveChunk", "closed_segments", "event_playlist", "segment_frames",
           "write_segments"]
