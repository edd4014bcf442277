"""Opus (RFC 7587) and Janus's multiopus (multichannel, RFC 7845 mapping family 1).

The packet duration comes from the TOC byte (RFC 6716 §3.1), never an assumed 20 ms: senders
use 10, 40 or 60 ms ptimes and code-3 packets carry up to 48 frames.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from melter.depay.base import AudioDepacketizer

#: Samples at 48 kHz of one frame, by TOC configuration number.
_FRAME_SAMPLES = (
    [480, 960, 1920, 2880] * 3  # SILK NB/MB/WB: 10, 20, 40, 60 ms
    + [480, 960] * 2  # Hybrid SWB/FB: 10, 20 ms
    + [120, 240, 480, 960] * 4  # CELT NB/WB/SWB/FB: 2.5, 5, 10, 20 ms
)

#: Standard libopus encoder lookahead at 48 kHz: what OpusHead pre-skip tells players to drop,
#: so decoded audio lines up with the sender's media clock.
PRE_SKIP = 312

#: A CELT fullband silence frame's body (after its TOC byte): a range-coded "silence" flag.
#: Decoders output exact zeros for it, at any of CELT's frame sizes.
_SILENCE_FRAME = b"\xff\xfe"
#: TOC bytes of one 20 ms silence frame (config 31, code 0) and of a packet of 2.5 ms frames
#: (config 28, code 3: a frame count follows).
_SILENCE_20MS = 0xF8
_SILENCE_2_5MS_FRAMES = 0xE3
_FRAME_20MS = 960
_FRAME_2_5MS = 120
#: The shortest silence packet written: the shortest 2.5 ms multiple over the pre-skip. A
#: decoder that starts mid-stream (a reader that sought) drops its pre-skip's worth of samples
#: from the first packets it decodes; only when the first packet alone covers them is the
#: audio after a seek where a read from the start puts it (see melter.compose.PreparedSegment).
SHORTEST_SILENCE = 3 * _FRAME_2_5MS


def packet_samples(payload: bytes) -> int:
    """Samples per channel at 48 kHz in one Opus packet (0 for an empty packet)."""
    if not payload:
        return 0
    toc = payload[0]
    per_frame = _FRAME_SAMPLES[toc >> 3]
    code = toc & 0x03
    if code == 0:
        return per_frame
    if code in (1, 2):
        return 2 * per_frame
    if len(payload) < 2:
        raise ValueError("Opus code-3 packet has no frame count byte")
    count = payload[1] & 0x3F
    if count == 0:
        raise ValueError("Opus code-3 packet has a frame count of 0")
    total = count * per_frame
    if total > 5760:
        raise ValueError(f"Opus packet lasts {total / 48} ms, over the 120 ms limit")
    return total


def opus_head(
    channels: int, mapping_family: int = 0, streams: int = 1, coupled: int = 0, mapping: bytes = b""
) -> bytes:
    """OpusHead (RFC 7845 §5.1), the codec configuration every Opus container needs."""
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, channels, PRE_SKIP, 48000, 0, mapping_family)
    if mapping_family:
        head += bytes((streams, coupled)) + mapping
    return head


class OpusDepacketizer(AudioDepacketizer):
    codec_name = "opus"
    sample_rate = 48000
    clock_rate = 48000

    def __init__(self, channels: int = 2) -> None:
        # WebRTC always signals opus/48000/2; the decoder handles mono packets in a stereo
        # stream, so stereo output is right whatever the sender encoded.
        self.channels = channels

    def samples(self, payload: bytes) -> int:
        return packet_samples(payload)

    def extradata(self) -> bytes:
        return opus_head(self.channels)

    def silence(self, samples: int) -> Iterator[tuple[bytes, int]]:
        """Silence packets lasting ``samples`` to the nearest 2.5 ms (Opus's shortest frame),
        none shorter than :data:`SHORTEST_SILENCE`: a gap under half of that is left
        unfilled, one under it filled by it (at most 3.75 ms off either way)."""
        total = _FRAME_2_5MS * round(samples / _FRAME_2_5MS)
        if total < SHORTEST_SILENCE:
            total = SHORTEST_SILENCE if 2 * samples >= SHORTEST_SILENCE else 0
        whole, rest = divmod(total, _FRAME_20MS)
        if rest and whole and rest < SHORTEST_SILENCE:
            whole, rest = whole - 1, rest + _FRAME_20MS
        for _ in range(whole):
            yield self._silence_packet(_SILENCE_20MS, 1), _FRAME_20MS
        if rest:
            yield self._silence_packet(_SILENCE_2_5MS_FRAMES, rest // _FRAME_2_5MS), rest

    def _silence_packet(self, toc: int, frames: int) -> bytes:
        if toc & 0x03 == 3:  # a constant-bitrate code-3 packet: its frame count, then frames
            return bytes((toc, frames)) + _SILENCE_FRAME * frames
        return bytes((toc,)) + _SILENCE_FRAME


class MultiopusDepacketizer(OpusDepacketizer):
    """Janus's ``multiopus``: 5.1 surround as four Opus streams (two coupled) in one packet.

    The layout is the one Janus and browsers negotiate (``channel_mapping=0,4,1,2,3,5;
    num_streams=4; coupled_streams=2``). Every elementary stream but the last is
    self-delimited, and all streams last as long as the first one's TOC says.
    """

    codec_name = "opus"
    MAPPING = bytes((0, 4, 1, 2, 3, 5))
    STREAMS = 4
    COUPLED = 2

    def __init__(self) -> None:
        super().__init__(channels=6)

    def extradata(self) -> bytes:
        return opus_head(6, 1, self.STREAMS, self.COUPLED, self.MAPPING)

    def _silence_packet(self, toc: int, frames: int) -> bytes:
        last = super()._silence_packet(toc, frames)
        # Self-delimited framing (RFC 6716 Appendix B): one frame length (all frames of a
        # constant-bitrate packet are that long) after the TOC and any frame count byte.
        head = 2 if toc & 0x03 == 3 else 1
        delimited = last[:head] + bytes((len(_SILENCE_FRAME),)) + last[head:]
        return delimited * (self.STREAMS - 1) + last
