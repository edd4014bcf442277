"""VP8 (RFC 7741): strip the payload descriptor, join the partitions of one picture."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from melter.depay.base import VideoDepacketizer, VideoFrame, check_payloads


@dataclass(frozen=True, slots=True)
class Vp8Descriptor:
    start_of_partition: bool
    partition_id: int
    non_reference: bool = False
    picture_id: int | None = None
    tl0_pic_idx: int | None = None
    tid: int | None = None
    key_idx: int | None = None

    @classmethod
    def parse(cls, data: bytes) -> tuple[Vp8Descriptor, bytes]:
        if not data:
            raise ValueError("VP8 payload descriptor is cut")
        first = data[0]
        pos = 1
        picture_id = tl0 = tid = key_idx = None
        if first & 0x80:  # X
            if len(data) < 2:
                raise ValueError("VP8 extension byte is cut")
            ext = data[1]
            pos = 2
            if ext & 0x80:  # I
                if len(data) < pos + 1:
                    raise ValueError("VP8 picture id is cut")
                if data[pos] & 0x80:
                    if len(data) < pos + 2:
                        raise ValueError("VP8 picture id is cut")
                    picture_id = ((data[pos] & 0x7F) << 8) | data[pos + 1]
                    pos += 2
                else:
                    picture_id = data[pos]
                    pos += 1
            if ext & 0x40:  # L
                if len(data) < pos + 1:
                    raise ValueError("VP8 TL0PICIDX is cut")
                tl0 = data[pos]
                pos += 1
            if ext & 0x30:  # T or K
                if len(data) < pos + 1:
                    raise ValueError("VP8 TID/KEYIDX is cut")
                tid = data[pos] >> 6 if ext & 0x20 else None
                key_idx = data[pos] & 0x1F if ext & 0x10 else None
                pos += 1
        descriptor = cls(
            start_of_partition=bool(first & 0x10),
            partition_id=first & 0x07,
            non_reference=bool(first & 0x20),
            picture_id=picture_id,
            tl0_pic_idx=tl0,
            tid=tid,
            key_idx=key_idx,
        )
        return descriptor, data[pos:]

    def __bytes__(self) -> bytes:
        first = (0x20 if self.non_reference else 0) | (0x10 if self.start_of_partition else 0)
        first |= self.partition_id & 0x07
        ext = 0
        tail = bytearray()
        if self.picture_id is not None:
            ext |= 0x80
            if self.picture_id > 0x7F:
                tail += bytes((0x80 | (self.picture_id >> 8), self.picture_id & 0xFF))
            else:
                tail.append(self.picture_id)
        if self.tl0_pic_idx is not None:
            ext |= 0x40
            tail.append(self.tl0_pic_idx)
        if self.tid is not None or self.key_idx is not None:
            ext |= (0x20 if self.tid is not None else 0) | (0x10 if self.key_idx is not None else 0)
            tail.append(((self.tid or 0) << 6) | (self.key_idx or 0))
        if ext:
            return bytes((first | 0x80, ext)) + bytes(tail)
        return bytes((first,))


def keyframe_info(frame: bytes) -> tuple[bool, int | None, int | None]:
    """``(keyframe, width, height)`` from a VP8 frame's uncompressed header (RFC 6386 §9.1)."""
    if len(frame) < 3:
        return False, None, None
    if frame[0] & 0x01:  # P bit: 1 = interframe
        return False, None, None
    if len(frame) < 10 or frame[3:6] != b"\x9d\x01\x2a":
        return True, None, None
    width = (frame[6] | (frame[7] << 8)) & 0x3FFF
    height = (frame[8] | (frame[9] << 8)) & 0x3FFF
    return True, width, height


class Vp8Depacketizer(VideoDepacketizer):
    codec_name = "vp8"

    def assemble(self, payloads: Sequence[bytes]) -> VideoFrame:
        check_payloads(payloads)
        first, rest = Vp8Descriptor.parse(payloads[0])
        if not (first.start_of_partition and first.partition_id == 0):
            raise ValueError("VP8 picture does not start with partition 0")
        parts = [rest]
        for payload in payloads[1:]:
            parts.append(Vp8Descriptor.parse(payload)[1])
        data = b"".join(parts)
        keyframe, width, height = keyframe_info(data)
        return VideoFrame(data, keyframe, width, height)

    def describe(self, payloads: Sequence[bytes]) -> VideoFrame:
        """Key frame and size from the first payload alone (the frame header is there)."""
        check_payloads(payloads)
        first, rest = Vp8Descriptor.parse(payloads[0])
        if not (first.start_of_partition and first.partition_id == 0):
            raise ValueError("VP8 picture does not start with partition 0")
        keyframe, width, height = keyframe_info(rest)
        return VideoFrame(b"", keyframe, width, height)

    def starts_picture(self, payload: bytes) -> bool | None:
        descriptor, _ = Vp8Descriptor.parse(payload)
        return descriptor.start_of_partition and descriptor.partition_id == 0
