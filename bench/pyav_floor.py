#!/usr/bin/env python3
"""The least any PyAV-based converter can cost: start Python, import PyAV, mux N packets.

``convert_bench.py`` runs this beside ``janus-pp-rec`` and ``melter convert``. It writes the
same number of packets as janus-pp-rec's output holds, of that output's average size, into the
same container, with nothing else done: no file read, no RTP parsed, no timing model. What it
takes is a lower bound for a converter that writes its packets through PyAV's Python API, as
``melter convert`` does.

    python -m bench.pyav_floor audio PACKETS BYTES OUT.opus
    python -m bench.pyav_floor video PACKETS BYTES OUT.webm
"""

from __future__ import annotations

import sys
from fractions import Fraction

import av

#: Frame durations of the benchmark's sources: 20 ms Opus frames, 15 fps VP8.
_FRAME_US = {"audio": 20_000, "video": 66_667}


def mux(kind: str, packets: int, payload_bytes: int, output: str) -> None:
    container = av.open(output, "w")
    stream: av.audio.stream.AudioStream | av.video.stream.VideoStream
    if kind == "audio":
        stream = container.add_stream("libopus", rate=48000)
        stream.codec_context.layout = "stereo"
    else:
        stream = container.add_stream("libvpx")
        stream.codec_context.width, stream.codec_context.height = 640, 360
        stream.codec_context.framerate = Fraction(0, 1)
    stream.codec_context.open()
    container.start_encoding()
    time_base = stream.time_base
    assert time_base is not None
    step = round(_FRAME_US[kind] * time_base.denominator / (1_000_000 * time_base.numerator))
    payload = bytes(payload_bytes)
    packet_type = av.Packet
    mux_one = container.mux_one
    for index in range(packets):
        packet = packet_type(payload)
        packet.stream = stream
        packet.pts = packet.dts = index * step
        packet.duration = step
        mux_one(packet)
    container.close()


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] not in _FRAME_US:
        print(__doc__, file=sys.stderr)
        return 2
    mux(argv[0], int(argv[1]), int(argv[2]), argv[3])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
