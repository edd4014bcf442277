"""Streaming reader for Janus MJR recordings.

An MJR file is append-only with no index and no checksum: a header, then length-prefixed frames
(one RTP packet each for audio and video). Because Janus may crash or a disk may fill, a cut file
is a valid prefix: the reader keeps every whole frame and says where it stopped. It never loads
the file whole, so memory stays flat however long the recording.

Three variants exist (see the project's format notes):

=========  ====================================  =======================================
variant    file header                           frame prefix
=========  ====================================  =======================================
legacy     ``MEETECHO`` u16=5 ``audio``/``video``  ``MEETECHO`` u16 len
MJR00001   ``MJR00001`` u16 len JSON              ``MEETECHO`` u16 len
MJR00002   ``MJR00002`` u16 len JSON              ``MEET`` u32 arrival-ms u16 len
=========  ====================================  =======================================
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from melter.errors import InputError

_U16 = struct.Struct("!H")
_V2_PREFIX = struct.Struct("!4sIH")
_V1_PREFIX = struct.Struct("!8sH")

#: Janus never records an RTP packet larger than its MTU-sized buffer; janus-pp-rec skips such
#: frames too. A bigger length in an audio/video file means the length field is damaged.
MAX_RTP_FRAME = 1500
#: The u32 millisecond arrival counter wraps after 49.7 days. A wrap is taken only from two
#: packets in the counter's last hour to one in its first: one damaged arrival time (a changed
#: byte, or a whole wild value) must not move every later packet 49.7 days on.
ARRIVAL_WRAP_WINDOW_MS = 3_600_000
_READ_CHUNK = 1 << 16


class Variant(StrEnum):
    LEGACY = "MEETECHO"
    V1 = "MJR00001"
    V2 = "MJR00002"


KIND_BY_LETTER = {"a": "audio", "v": "video", "d": "data"}
CODECS = {
    "audio": {"opus", "multiopus", "g711", "pcmu", "pcma", "g722", "l16", "l16-48"},
    "video": {"vp8", "vp9", "h264", "h265", "av1"},
    "data": {"text", "binary"},
}


class EmptyRecordingError(InputError):
    """A recording Janus created but never wrote a packet to (just the magic)."""


@dataclass(frozen=True)
class MjrHeader:
    """The recording's header; field names follow what they mean, not the JSON letters."""

    variant: Variant
    kind: str
    codec: str
    fmtp: str | None = None
    description: str | None = None
    extensions: dict[int, str] = field(default_factory=dict)
    created_us: int | None = None
    first_packet_us: int | None = None
    red_pt: int | None = None
    encrypted: bool = False
    raw: dict[str, Any] = field(default_factory=dict)
    frames_offset: int = 0

    def extension_id(self, uri_suffix: str) -> int | None:
        """The header-extension id whose URI ends with ``uri_suffix``, if the header maps it."""
        for ext_id, uri in self.extensions.items():
            if uri.endswith(uri_suffix):
                return ext_id
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant.value,
            "kind": self.kind,
            "codec": self.codec,
            "fmtp": self.fmtp,
            "description": self.description,
            "extensions": {str(k): v for k, v in self.extensions.items()},
            "created_us": self.created_us,
            "first_packet_us": self.first_packet_us,
            "red_pt": self.red_pt,
            "encrypted": self.encrypted,
        }


@dataclass(frozen=True, slots=True)
class MjrFrame:
    """One stored frame: where it starts in the file, when it arrived, and its bytes.

    ``arrival_ms`` counts milliseconds since the header was written (MJR00002 only; ``None``
    for older variants, which stored no arrival times).
    """

    offset: int
    arrival_ms: int | None
    data: bytes


def _parse_json_header(path: Path, variant: Variant, raw: bytes, frames_offset: int) -> MjrHeader:
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"header JSON is not valid ({exc})", offset=10) from None
    if not isinstance(info, dict):
        raise InputError(path, "header JSON is not an object", offset=10)
    letter = info.get("t")
    kind = KIND_BY_LETTER.get(letter) if isinstance(letter, str) else None
    if kind is None:
        raise InputError(path, f"header field t={letter!r} is not a, v or d", offset=10)
    codec = info.get("c")
    if not isinstance(codec, str) or codec.lower() not in CODECS[kind]:
        raise InputError(path, f"header field c={codec!r} is not a known {kind} codec", offset=10)
    extensions: dict[int, str] = {}
    raw_ext = info.get("x")
    if isinstance(raw_ext, dict):
        for key, uri in raw_ext.items():
            try:
                ext_id = int(key)
            except (TypeError, ValueError):
                continue
            if isinstance(uri, str) and 1 <= ext_id <= 255:
                extensions[ext_id] = uri

    def _int(name: str) -> int | None:
        # Times in µs since the epoch: anything beyond 2^53 (year 2255), infinite or not a
        # number is a damaged header, not a time.
        value = info.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if not -(2**53) <= value <= 2**53:  # also False for NaN
            return None
        return int(value)

    return MjrHeader(
        variant=variant,
        kind=kind,
        codec=codec.lower(),
        fmtp=info.get("f") if isinstance(info.get("f"), str) else None,
        description=info.get("d") if isinstance(info.get("d"), str) else None,
        extensions=extensions,
        created_us=_int("s"),
        first_packet_us=_int("u"),
        red_pt=_int("or"),
        encrypted=info.get("e") is True,
        raw=info,
        frames_offset=frames_offset,
    )


class MjrReader:
    """Reads one MJR file: the header at once, the frames lazily.

    Damage inside the file does not stop reading: a frame whose prefix is wrong is skipped up
    to the next valid prefix and counted; a cut at the end keeps every whole frame. What was
    skipped is listed in :attr:`warnings` with byte offsets.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.warnings: list[str] = []
        self.skipped_bytes = 0
        self.truncated_at: int | None = None
        try:
            self.size = self.path.stat().st_size
            with self.path.open("rb") as handle:
                self.header = self._read_header(handle)
        except OSError as exc:
            raise InputError(self.path, exc.strerror or str(exc)) from None

    # -- header -------------------------------------------------------------------------------
    def _read_header(self, handle: IO[bytes]) -> MjrHeader:
        path = self.path
        magic = handle.read(8)
        if not magic:
            raise EmptyRecordingError(path, "empty file (0 bytes)", offset=0)
        if len(magic) < 8 or magic not in (b"MJR00002", b"MJR00001", b"MEETECHO"):
            raise InputError(path, f"not an MJR recording (magic {magic[:8]!r})", offset=0)
        length_bytes = handle.read(2)
        if not length_bytes:
            raise EmptyRecordingError(path, "recording holds no packets (magic only)", offset=8)
        if len(length_bytes) < 2:
            raise InputError(path, "file ends inside the header length", offset=8)
        (length,) = _U16.unpack(length_bytes)
        body = handle.read(length)
        if len(body) < length:
            raise InputError(path, f"file ends inside the {length}-byte header", offset=10)
        frames_offset = 10 + length
        if magic == b"MEETECHO":
            kind = body.decode("ascii", "replace")
            if kind not in ("audio", "video"):
                raise InputError(path, f"legacy header names {kind!r}, not audio or video", 10)
            # Janus before 0.0.9 recorded only Opus and VP8.
            codec = "opus" if kind == "audio" else "vp8"
            return MjrHeader(Variant.LEGACY, kind, codec, frames_offset=frames_offset)
        return _parse_json_header(path, Variant(magic.decode()), body, frames_offset)

    # -- frames -------------------------------------------------------------------------------
    def frames(self) -> Iterator[MjrFrame]:
        """Yield every readable frame in file order (arrival order)."""
        try:
            with self.path.open("rb", buffering=1 << 20) as handle:
                handle.seek(self.header.frames_offset)
                if self.header.variant is Variant.V2:
                    yield from self._frames_v2(handle)
                else:
                    yield from self._frames_v1(handle)
        except OSError as exc:
            raise InputError(self.path, exc.strerror or str(exc)) from None

    def _max_length(self) -> int:
        return MAX_RTP_FRAME if self.header.kind != "data" else 0xFFFF

    def _frames_v2(self, handle: IO[bytes]) -> Iterator[MjrFrame]:
        offset = self.header.frames_offset
        read = handle.read
        unpack = _V2_PREFIX.unpack
        max_length = self._max_length()
        last_arrival = before_last = 0  # raw u32 values
        wraps = 0
        while True:
            prefix = read(10)
            if len(prefix) < 10:
                if prefix:
                    self.note_truncated(offset, "a frame header")
                return
            magic, arrival, length = unpack(prefix)
            if magic != b"MEET" or length > max_length or length == 0:
                what = "bad frame prefix" if magic != b"MEET" else f"frame length {length}"
                new_offset = self._resync(handle, offset + 1, b"MEET", what, offset)
                if new_offset is None:
                    return
                offset = new_offset
                continue
            data = read(length)
            if len(data) < length:
                self.note_truncated(offset, f"a {length}-byte frame")
                return
            top = (1 << 32) - ARRIVAL_WRAP_WINDOW_MS
            if arrival < ARRIVAL_WRAP_WINDOW_MS and last_arrival >= top and before_last >= top:
                wraps += 1  # the u32 millisecond counter wrapped (49.7 days)
            before_last, last_arrival = last_arrival, arrival
            yield MjrFrame(offset, arrival + (wraps << 32), data)
            offset += 10 + length

    def _frames_v1(self, handle: IO[bytes]) -> Iterator[MjrFrame]:
        offset = self.header.frames_offset
        read = handle.read
        unpack = _V1_PREFIX.unpack
        max_length = self._max_length()
        while True:
            prefix = read(10)
            if len(prefix) < 10:
                if prefix:
                    self.note_truncated(offset, "a frame header")
                return
            magic, length = unpack(prefix)
            if magic != b"MEETECHO" or length > max_length or length == 0:
                what = "bad frame prefix" if magic != b"MEETECHO" else f"frame length {length}"
                new_offset = self._resync(handle, offset + 1, b"MEETECHO", what, offset)
                if new_offset is None:
                    return
                offset = new_offset
                continue
            data = read(length)
            if len(data) < length:
                self.note_truncated(offset, f"a {length}-byte frame")
                return
            yield MjrFrame(offset, None, data)
            offset += 10 + length

    def note_truncated(self, offset: int, what: str) -> None:
        """The file ends inside a frame at ``offset``: what comes before it is kept."""
        self.truncated_at = offset
        self.warnings.append(
            f"{self.path}: file ends inside {what} at byte {offset}; kept everything before it"
        )

    def _resync(
        self, handle: IO[bytes], start: int, magic: bytes, what: str, bad_offset: int
    ) -> int | None:
        """Find the next frame prefix after damaged bytes; return its offset (handle left there)."""
        position = start
        handle.seek(position)
        tail = b""
        while True:
            chunk = handle.read(_READ_CHUNK)
            if not chunk:
                self.skipped_bytes += self.size - bad_offset
                self.warnings.append(
                    f"{self.path}: {what} at byte {bad_offset}; no valid frame after it, "
                    f"{self.size - bad_offset} bytes skipped"
                )
                return None
            window = tail + chunk
            base = position - len(tail)
            index = window.find(magic)
            while index != -1:
                candidate = base + index
                if self._plausible_frame(handle, candidate, magic):
                    self.skipped_bytes += candidate - bad_offset
                    self.warnings.append(
                        f"{self.path}: {what} at byte {bad_offset}; "
                        f"{candidate - bad_offset} bytes skipped to the next frame at {candidate}"
                    )
                    handle.seek(candidate)
                    return candidate
                index = window.find(magic, index + 1)
            position += len(chunk)
            tail = window[-(len(magic) - 1) :]
            handle.seek(position)

    def _plausible_frame(self, handle: IO[bytes], candidate: int, magic: bytes) -> bool:
        """A prefix whose length is sane and whose payload looks like RTP (or data)."""
        handle.seek(candidate)
        prefix = handle.read(10)
        if len(prefix) < 10:
            return False
        length = _U16.unpack_from(prefix, 8)[0]
        if length == 0 or length > self._max_length():
            return False
        if self.header.kind == "data":
            return True
        first = handle.read(1)
        return bool(first) and first[0] >> 6 == 2
