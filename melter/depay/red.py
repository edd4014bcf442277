"""RED (RFC 2198): redundant audio blocks in front of the primary one.

Janus records Opus-in-RED as it came (header field ``or`` gives RED's payload type). The primary
block is the packet's own audio; the redundant blocks repeat earlier packets and are used to
fill losses.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RedBlock:
    payload_type: int
    timestamp_offset: int
    data: bytes


def parse_red(payload: bytes) -> tuple[list[RedBlock], bytes]:
    """``(redundant blocks oldest first, primary data)``."""
    headers: list[tuple[int, int, int]] = []
    pos = 0
    while True:
        if pos >= len(payload):
            raise ValueError("RED block header is cut")
        first = payload[pos]
        if not first & 0x80:  # F=0: the last (primary) header, one byte
            primary_pt = first & 0x7F
            pos += 1
            break
        if pos + 4 > len(payload):
            raise ValueError("RED block header is cut")
        word = int.from_bytes(payload[pos : pos + 4], "big")
        headers.append(((word >> 24) & 0x7F, (word >> 10) & 0x3FFF, word & 0x3FF))
        pos += 4
    blocks = []
    for pt, offset, length in headers:
        if pos + length > len(payload):
            raise ValueError(f"RED block of {length} bytes is cut")
        blocks.append(RedBlock(pt, offset, payload[pos : pos + length]))
        pos += length
    del primary_pt
    return blocks, payload[pos:]


def build_red(primary_pt: int, primary: bytes, redundant: list[RedBlock]) -> bytes:
    out = bytearray()
    for block in redundant:
        word = 0x80000000 | (block.payload_type << 24) | (block.timestamp_offset << 10)
        out += (word | len(block.data)).to_bytes(4, "big")
    out.append(primary_pt & 0x7F)
    for block in redundant:
        out += block.data
    return bytes(out + primary)
