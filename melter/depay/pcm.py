"""G.711 (µ-law, A-law), G.722 and L16: fixed-rate codecs decoded to PCM WAV.

No common container plays these well, so Melter decodes them (with FFmpeg's decoders through
PyAV). Their durations follow from the payload size alone.
"""

from __future__ import annotations

from collections.abc import Iterator

from melter.depay.base import AudioDepacketizer


class _FixedRate(AudioDepacketizer):
    bytes_per_sample: float = 1.0
    silence_byte = b"\x00"

    def samples(self, payload: bytes) -> int:
        return int(len(payload) / self.bytes_per_sample)

    def silence(self, samples: int) -> Iterator[tuple[bytes, int]]:
        # In blocks of a second: a gap may last hours.
        while samples > 0:
            block = min(samples, self.sample_rate)
            yield self.silence_byte * int(block * self.bytes_per_sample), block
            samples -= block

    @property
    def is_pcm(self) -> bool:
        return True


class PcmuDepacketizer(_FixedRate):
    codec_name = "pcm_mulaw"
    sample_rate = 8000
    clock_rate = 8000
    silence_byte = b"\xff"


class PcmaDepacketizer(_FixedRate):
    codec_name = "pcm_alaw"
    sample_rate = 8000
    clock_rate = 8000
    silence_byte = b"\xd5"


class G722Depacketizer(_FixedRate):
    """G.722: 16 kHz audio, 4 bits a sample, on an 8 kHz RTP clock (RFC 3551 §4.5.2)."""

    codec_name = "adpcm_g722"
    sample_rate = 16000
    clock_rate = 8000
    bytes_per_sample = 0.5
    # A G.722 byte that decodes to (near) silence from any state: both sub-bands at zero.
    silence_byte = b"\xfa"


class L16Depacketizer(_FixedRate):
    """Linear 16-bit big-endian PCM (RFC 3551 §4.5.11), mono."""

    codec_name = "pcm_s16be"
    bytes_per_sample = 2.0

    def __init__(self, sample_rate: int = 16000) -> None:
        self.sample_rate = sample_rate
        self.clock_rate = sample_rate
