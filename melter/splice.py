"""AAC encoded in pieces that join without a seam.

A long meeting's audio is encoded by several units at once, each a stretch of it, and the join
only copies packets. AAC cannot simply be cut and glued: each packet's pictures of sound
overlap the next one's (the MDCT's halves), an encoder starts with a packet of priming, and it
pads its last one. So each piece is encoded from :data:`RUN_IN` samples before its stretch
to :data:`CONTEXT` after it, on a grid of whole packets counted from the meeting's start
(:data:`FRAME` samples each), and keeps only the packets of its stretch: where two pieces
meet, the last packet of one and the first of the next were made by encoders that both heard
the sound on either side, so their halves add up as one encoder's would (to within the
encoder's own noise), with no sample lost or repeated. Only the first piece keeps its priming
packet, and only the last one its padding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from melter.errors import MelterError

#: Samples in one AAC packet.
FRAME = 1024
#: Samples each piece hears after its stretch (about 3 s): the packets at its end are made
#: by an encoder that heard what follows, as a whole encode's are.
CONTEXT = 144 * FRAME
#: Samples each piece's encoder runs in for before its stretch (about 10 s): FFmpeg's encoder
#: settles its quantizer over several seconds, and a piece must reach its stretch with the
#: quality a whole encode has there. Measured on a four-voice meeting: after a 3 s run-in the
#: first 3 to 6 s of a piece lay 20 times further from the mix than a whole encode (-36 dB
#: against -60 dB); after 10 s, no further.
RUN_IN = 469 * FRAME


def on_grid(sample: int) -> int:
    """The first packet border at or after ``sample`` (counted from the meeting's start)."""
    return -(-sample // FRAME) * FRAME


@dataclass(frozen=True)
class Stretch:
    """The packets a piece keeps: those starting in ``[start, end)`` (samples of the
    meeting; ``end`` None for the last piece, which keeps its padding too). The first piece
    (``start`` 0) keeps the encoder's priming packet before it."""

    start: int
    end: int | None

    @property
    def first(self) -> bool:
        return self.start == 0


def _pcm(path: Path) -> np.ndarray:
    """A WAV file's 16-bit samples, shaped (samples, channels)."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        channels = stream.codec_context.channels
        chunks = [frame.to_ndarray().reshape(-1) for frame in container.decode(stream)]
    data = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    return data.reshape(-1, channels)


def encode_stretch(pcm: Path, pcm_start: int, stretch: Stretch, target: Path, *,
                   bit_rate: int, rate: int = 48000) -> int:
    """Encode the PCM file ``pcm`` (whose first sample is sample ``pcm_start`` of the
    meeting) and write the packets of ``stretch`` to ``target`` (Matroska); the samples they
    hold (priming and padding aside).

    The PCM must reach :data:`RUN_IN` samples before the stretch (or the meeting's start)
    and :data:`CONTEXT` after it, where the meeting goes on there.
    """
    samples = _pcm(pcm)
    begin = on_grid(pcm_start)  # encoding starts on the grid: packets fall on it
    if not stretch.first and stretch.start - begin < min(RUN_IN, stretch.start):
        raise MelterError(f"{pcm}: {stretch.start - begin} samples before the stretch, "
                          f"not {min(RUN_IN, stretch.start)}")
    if stretch.end is not None and pcm_start + len(samples) - stretch.end < CONTEXT:
        raise MelterError(f"{pcm}: the audio ends too soon after its stretch")
    samples = samples[begin - pcm_start:]
    kept = 0
    with av.open(str(target), "w", format="matroska") as out:
        stream = out.add_stream("aac", rate=rate, layout="stereo")
        stream.bit_rate = bit_rate
        stream.codec_context.time_base = Fraction(1, rate)

        def keep(packets: Sequence[av.Packet]) -> None:
            nonlocal kept
            for packet in packets:
                if packet.pts is None:
                    continue
                at = begin + packet.pts
                if (at >= stretch.start or (stretch.first and at < 0)) and (
                        stretch.end is None or at < stretch.end):
                    out.mux(packet)
                    kept += 1

        for frame in _frames(samples, rate):
            keep(stream.encode(frame))
        keep(stream.encode(None))
    return kept


def _frames(samples: np.ndarray, rate: int) -> Iterator[av.AudioFrame]:
    for start in range(0, len(samples), FRAME):
        piece = np.ascontiguousarray(samples[start:start + FRAME]).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(piece, format="s16", layout="stereo")
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        yield frame


def join_pieces(video: Path, pieces: Sequence[Path], target: Path, fmt: str, *,
                rate: int = 48000, options: dict[str, str] | None = None) -> int:
    """Mux ``video``'s video stream and the AAC packets of ``pieces`` (from
    :func:`encode_stretch`, in order) into ``target``, copying both; the audio packets
    written. Audio timestamps count packets from the meeting's start (the first piece's
    priming packet before it, as an encoder's own file has it)."""
    with av.open(str(video)) as source, \
            av.open(str(target), "w", format=fmt, options=options or {}) as out:
        vin = source.streams.video[0]
        vout = out.add_stream_from_template(vin)
        audio = list(audio_packets(pieces, rate))
        if not audio:
            raise MelterError("no audio packets to join")
        with av.open(str(pieces[0])) as first:
            aout = out.add_stream_from_template(first.streams.audio[0])
        aout.time_base = Fraction(1, rate)
        written = 0
        pending = iter(audio)
        next_audio = next(pending, None)
        for packet in source.demux(vin):
            if packet.dts is None or packet.time_base is None:
                continue
            video_at = float(packet.dts * packet.time_base)
            while next_audio is not None and next_audio[0] / rate <= video_at:
                out.mux(_audio_packet(next_audio, aout))
                written += 1
                next_audio = next(pending, None)
            packet.stream = vout
            out.mux(packet)
        while next_audio is not None:
            out.mux(_audio_packet(next_audio, aout))
            written += 1
            next_audio = next(pending, None)
    return written


def first_packet(stretch: Stretch) -> int:
    """Where the first packet of a piece keeping ``stretch`` starts (samples of the meeting):
    its stretch's start, or one packet before for the first piece (the encoder's priming)."""
    return stretch.start - (FRAME if stretch.first else 0)


def audio_packets(pieces: Sequence[Path], rate: int, start: int = -FRAME,
                  ) -> Iterator[tuple[int, bytes]]:
    """(pts in samples, data) of every piece's packets (from :func:`encode_stretch`, one
    after the other), counted from the meeting's start; ``start``: where the first piece's
    first packet starts (:func:`first_packet`; by default the first piece of the meeting,
    whose priming packet lies one packet before it)."""
    at = start
    for piece in pieces:
        with av.open(str(piece)) as container:
            stream = container.streams.audio[0]
            if stream.rate != rate:
                raise MelterError(f"{piece.name}: audio at {stream.rate} Hz, not {rate}")
            for packet in container.demux(stream):
                if packet.size:
                    yield at, bytes(packet)
                    at += FRAME


def _audio_packet(item: tuple[int, bytes], stream: av.audio.stream.AudioStream) -> av.Packet:
    pts, data = item
    packet = av.Packet(data)
    packet.stream = stream
    packet.pts = packet.dts = pts
    packet.duration = FRAME
    packet.time_base = Fraction(1, stream.rate or 48000)
    return packet


__all__ = ["CONTEXT", "FRAME", "RUN_IN", "Stretch", "audio_packets", "encode_stretch",
           "first_packet", "join_pieces", "on_grid"]
