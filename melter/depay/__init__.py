"""Payload formats: one module per codec, each turning RTP payloads into codec frames."""

from __future__ import annotations

from melter.depay.base import AudioDepacketizer, VideoDepacketizer, VideoFrame
from melter.errors import UnsupportedError

__all__ = [
    "AudioDepacketizer",
    "VideoDepacketizer",
    "VideoFrame",
    "audio_depacketizer",
    "video_depacketizer",
]

#: RTP clock rates by MJR codec name (RFC 3551 keeps G.722 on an 8 kHz clock).
CLOCK_RATES = {
    "opus": 48000,
    "multiopus": 48000,
    "pcmu": 8000,
    "pcma": 8000,
    "g711": 8000,
    "g722": 8000,
    "l16": 16000,
    "l16-48": 48000,
    "vp8": 90000,
    "vp9": 90000,
    "h264": 90000,
    "h265": 90000,
    "av1": 90000,
}


def resolve_codec(codec: str, payload_type: int | None) -> str:
    """Janus writes ``g711`` for both laws; the static payload type tells which (0 µ, 8 A)."""
    if codec == "g711":
        return "pcma" if payload_type == 8 else "pcmu"
    return codec


def audio_depacketizer(codec: str) -> AudioDepacketizer:
    from melter.depay import opus, pcm

    if codec == "opus":
        return opus.OpusDepacketizer()
    if codec == "multiopus":
        return opus.MultiopusDepacketizer()
    if codec == "pcmu":
        return pcm.PcmuDepacketizer()
    if codec == "pcma":
        return pcm.PcmaDepacketizer()
    if codec == "g722":
        return pcm.G722Depacketizer()
    if codec == "l16":
        return pcm.L16Depacketizer(16000)
    if codec == "l16-48":
        return pcm.L16Depacketizer(48000)
    raise UnsupportedError(f"audio codec {codec!r} is not supported")


def video_depacketizer(codec: str) -> VideoDepacketizer:
    if codec == "vp8":
        from melter.depay.vp8 import Vp8Depacketizer

        return Vp8Depacketizer()
    if codec == "h264":
        from melter.depay.h264 import H264Depacketizer

        return H264Depacketizer()
    if codec == "vp9":
        from melter.depay.vp9 import Vp9Depacketizer

        return Vp9Depacketizer()
    if codec == "h265":
        from melter.depay.h265 import H265Depacketizer

        return H265Depacketizer()
    if codec == "av1":
        from melter.depay.av1 import Av1Depacketizer

        return Av1Depacketizer()
    raise UnsupportedError(f"video codec {codec!r} is not supported")
