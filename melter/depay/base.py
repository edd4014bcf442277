"""What every payload format gives back: codec frames the container writer can mux.

A video depacketizer receives the payloads of one picture (the RTP packets sharing one
timestamp, in sequence order) and returns the picture's bitstream; an audio depacketizer maps
one payload to one codec packet and knows how many samples it holds. Both are pure: bytes in,
bytes out, ``ValueError`` naming the field when a payload is malformed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class VideoFrame:
    """One picture's bitstream as the decoder wants it."""

    data: bytes
    keyframe: bool
    width: int | None = None
    height: int | None = None


class VideoDepacketizer(ABC):
    #: FFmpeg codec name used for the output stream.
    codec_name: str

    @abstractmethod
    def assemble(self, payloads: Sequence[bytes]) -> VideoFrame:
        """Join the payloads of one picture (sequence order) into its bitstream."""

    def describe(self, payloads: Sequence[bytes]) -> VideoFrame:
        """Key frame and size of a picture, for analysis (formats may skip the joining)."""
        return self.assemble(payloads)

    def extradata(self) -> bytes | None:
        """Stream-level configuration learnt from the frames seen so far (H.264 SPS/PPS)."""
        return None

    def starts_picture(self, payload: bytes) -> bool | None:
        """Whether this payload begins a picture (``None``: the format does not say)."""
        return None


class AudioDepacketizer(ABC):
    codec_name: str
    #: Samples per second of the decoded audio (not the RTP clock: G.722 has 16 kHz audio on
    #: an 8 kHz RTP clock).
    sample_rate: int
    #: The RTP clock rate of this payload format.
    clock_rate: int
    channels: int = 1

    @abstractmethod
    def samples(self, payload: bytes) -> int:
        """How many samples (per channel, at :attr:`sample_rate`) this payload decodes to."""

    def frame(self, payload: bytes) -> bytes:
        """The codec packet carried by the payload (usually the payload itself)."""
        return payload

    def extradata(self) -> bytes | None:
        return None

    def silence(self, samples: int) -> Iterator[tuple[bytes, int]]:
        """Codec packets that decode to ``samples`` of silence, as ``(packet, samples)``.

        Generated as they are written, never all at once: a gap may last hours.
        May fall short of ``samples`` by less than the format's smallest frame.
        """
        raise NotImplementedError

    @property
    def is_pcm(self) -> bool:
        """Whether the output must be decoded to PCM (formats no container carries well)."""
        return False


def join_nal_units(
    payloads: Sequence[bytes],
    split: Callable[[bytes], tuple[list[bytes], bool, bool]],
    is_fragment: Callable[[bytes], bool],
    name: str,
) -> list[bytes]:
    """NAL units of one picture from H.264/H.265 payloads (single, aggregated, fragmented).

    ``split`` gives a payload's units (or its fragment) with the fragment's start and end
    flags; a fragmented unit must arrive whole, start to end, or the picture is refused.
    """
    units: list[bytes] = []
    fragment: bytearray | None = None
    for payload in payloads:
        parts, start, end = split(payload)
        if is_fragment(payload):
            if start:
                if fragment is not None:
                    raise ValueError(f"{name} fragmented unit without its end")
                fragment = bytearray(parts[0])
            elif fragment is None:
                raise ValueError(f"{name} fragment without its start")
            else:
                fragment += parts[0]
            if end:
                units.append(bytes(fragment))
                fragment = None
        else:
            if fragment is not None:
                raise ValueError(f"{name} fragmented unit without its end")
            units.extend(parts)
    if fragment is not None:
        raise ValueError(f"{name} fragmented unit without its end")
    return units


def check_payloads(payloads: Sequence[bytes]) -> None:
    if not payloads:
        raise ValueError("picture has no payloads")
