"""HLS: a finished MP4 remuxed, without re-encoding, into a VOD playlist of MPEG-TS segments.

MPEG-TS segments rather than fragmented MP4: every HLS client plays them (fMP4 needs HLS
version 7 and an initialisation segment that has to stay paired with its media segments), each
segment stands alone, and H.264/AAC gain nothing from fMP4. The cuts come at the MP4's key
frames, so the encoder must put one at every segment boundary (the ``hls`` preset of
:mod:`melter.render` fixes the GOP at the segment length and turns scene-cut key frames off).

A playlist is only as good as the files it names. An output is therefore staged whole in a
private folder beside its target; its segments are then linked into place under names derived
from the playlist's (``meeting.m3u8``: ``meeting-00000.ts``, ...), never over an existing file,
and the playlist takes its name last. A reader sees no playlist, or the previous one with all
its segments, or the new one with all its segments. A playlist that replaces another gets
segments under a free stem (``meeting-2-00000.ts``), so the old playlist's segments stay
untouched until the new playlist has its name; only then are they removed.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av

from melter.convert import file_mode
from melter.errors import MelterError
from melter.rooted import NotRegularFile, link_new, read_at

SEGMENT_SUFFIX = ".ts"
#: A 12-hour meeting in 6 s segments has a playlist of about 300 kB.
PLAYLIST_LIMIT = 16 << 20
_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass(frozen=True)
class Playlist:
    """A VOD media playlist: its lines as written, and its segments (name, seconds) in order."""

    lines: list[str]
    segments: list[tuple[str, float]]

    @property
    def duration_s(self) -> float:
        return sum(seconds for _, seconds in self.segments)

    def renamed(self, names: list[str]) -> str:
        """The playlist's text with its segments named ``names`` (in order)."""
        given = iter(names)
        return "".join(
            (line if line.startswith("#") or not line.strip() else next(given)) + "\n"
            for line in self.lines)


def parse_playlist(text: str, *, live: bool = False) -> Playlist:
    """A complete VOD playlist whose segments are plain file names beside it; MelterError
    for anything else (a playlist still being written lacks ``#EXT-X-ENDLIST``).
    ``live``: an EVENT playlist that still grows (:func:`event_playlist`) is read too."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "#EXTM3U":
        raise MelterError("not an HLS playlist")
    growing = live and "#EXT-X-PLAYLIST-TYPE:EVENT" in lines
    if not growing and ("#EXT-X-PLAYLIST-TYPE:VOD" not in lines
                        or "#EXT-X-ENDLIST" not in lines):
        raise MelterError("not a complete VOD playlist")
    segments: list[tuple[str, float]] = []
    seconds: float | None = None
    for line in lines:
        if line.startswith("#EXTINF:"):
            try:
                seconds = float(line[len("#EXTINF:"):].split(",", 1)[0])
            except ValueError:
                raise MelterError(f"bad segment duration {line!r}") from None
        elif line.strip() and not line.startswith("#"):
            name = line.strip()
            if seconds is None or "/" in name or name.startswith("."):
                raise MelterError(f"segment {name!r} is not a file beside the playlist")
            segments.append((name, seconds))
            seconds = None
    if not segments and not growing:
        raise MelterError("a playlist without segments")
    return Playlist(lines, segments)


def segment_name(stem: str, index: int) -> str:
    return f"{stem}-{index:05d}{SEGMENT_SUFFIX}"


def _segments_of(stem: str) -> re.Pattern[str]:
    return re.compile(re.escape(stem) + r"-\d{5,}" + re.escape(SEGMENT_SUFFIX))


def free_stem(folder: int, base: str) -> str:
    """The first of ``base``, ``base-2``, ``base-3``... that names no segment in the folder
    ``folder`` yet."""
    present = os.listdir(folder)
    for number in itertools.count(1):
        stem = base if number == 1 else f"{base}-{number}"
        pattern = _segments_of(stem)
        if not any(pattern.fullmatch(entry) for entry in present):
            return stem
    raise AssertionError("unreachable")


def segment(source: Path, playlist: Path, seconds: int) -> Playlist:
    """Cut ``source`` (an MP4) at its key frames into MPEG-TS segments of about ``seconds``,
    written beside ``playlist`` and named after it, packets copied as they are."""
    options = {
        "hls_time": str(seconds),
        "hls_playlist_type": "vod",
        "hls_list_size": "0",
        "hls_segment_type": "mpegts",
        "hls_flags": "independent_segments",
        "hls_segment_filename": str(playlist.with_name(f"{playlist.stem}-%05d{SEGMENT_SUFFIX}")),
    }
    try:
        with av.open(str(source)) as reader, \
                av.open(str(playlist), "w", format="hls", options=options) as writer:
            kept = [s for s in reader.streams if s.type in ("video", "audio")]
            streams = {s.index: writer.add_stream_from_template(s) for s in kept}
            for packet in reader.demux(kept):
                if packet.dts is None:
                    continue  # the demuxer's empty packet at the end of a stream
                packet.stream = streams[packet.stream.index]
                writer.mux(packet)
    except av.error.FFmpegError as exc:
        raise MelterError(f"{source.name} could not be cut into HLS segments ({exc})") from None
    return parse_playlist(playlist.read_text())


def _read(folder: int, name: str) -> bytes:
    try:
        data = read_at(folder, name, PLAYLIST_LIMIT + 1)
    except NotRegularFile as exc:
        raise MelterError(str(exc)) from None
    if len(data) > PLAYLIST_LIMIT:
        raise MelterError(f"{name}: more than {PLAYLIST_LIMIT} bytes")
    return data


def read_playlist(folder: int, name: str, *, live: bool = False) -> Playlist:
    """The playlist ``name`` in the folder ``folder`` (not through a link); ``live``: an
    EVENT playlist too."""
    try:
        text = _read(folder, name).decode("utf-8")
    except UnicodeDecodeError:
        raise MelterError(f"{name}: not UTF-8 text") from None
    try:
        return parse_playlist(text, live=live)
    except MelterError as exc:
        raise MelterError(f"{name}: {exc}") from None


def _settle(folder: int, name: str, mode: int) -> None:
    """Give a staged file its final mode and put it on the disk before anything names it."""
    handle = os.open(name, _NOFOLLOW, dir_fd=folder)
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise MelterError(f"staged {name} is not a regular file")
        os.fchmod(handle, mode)
        os.fsync(handle)
    finally:
        os.close(handle)


def named_after(playlist: str, segment: str) -> bool:
    """Whether ``segment`` is a name this module gives the segments of ``playlist``
    (``<stem>[-n]-NNNNN.ts``): the only files a replacement or a cleanup may remove, whatever
    else a playlist or a record names."""
    stem = re.escape(Path(playlist).stem)
    return re.fullmatch(stem + r"(?:-\d+)?-\d{5,}" + re.escape(SEGMENT_SUFFIX), segment) is not None


def _old_segments(target: int, name: str) -> list[str]:
    """The segments of the playlist ``name`` in ``target`` that replacing it removes."""
    try:
        old = read_playlist(target, name, live=True)
    except (OSError, MelterError):
        return []
    return [segment for segment, _ in old.segments if named_after(name, segment)]


def place(source: int, staged: str, target: int, name: str, *, replace: bool, mode: int,
          stem: str | None = None) -> list[str]:
    """Put the staged playlist ``staged`` (in the folder ``source``) and its segments in
    place as ``name`` in the folder ``target``; the names of the segments placed.

    Segments take ``stem``'s names (default: the first free stem of ``name``), each linked
    without replacing anything and on the disk before the playlist names it; the playlist
    comes last. ``replace``: an existing playlist ``name`` is replaced (and its segments
    removed afterwards); otherwise an existing ``name`` fails the placement
    (FileExistsError) and leaves nothing of it behind. Both folders are descriptors, so no
    name is looked up through a link; every file gets ``mode``.
    """
    playlist = read_playlist(source, staged)
    if stem is None:
        stem = free_stem(target, Path(name).stem)
    names = [segment_name(stem, i) for i in range(len(playlist.segments))]
    placed: list[str] = []
    temp = f".{name}.{secrets.token_hex(4)}.part"
    try:
        for (staged_segment, _), final in zip(playlist.segments, names, strict=True):
            _settle(source, staged_segment, mode)
            link_new(source, staged_segment, target, final)
            placed.append(final)
        os.fsync(target)
        handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=target)
        try:
            os.fchmod(handle, mode)
            view = memoryview(playlist.renamed(names).encode())
            while view:
                view = view[os.write(handle, view):]
            os.fsync(handle)
        finally:
            os.close(handle)
        old = _old_segments(target, name) if replace else []
        if replace:
            os.replace(temp, name, src_dir_fd=target, dst_dir_fd=target)
        else:
            link_new(target, temp, target, name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=target)
        os.fsync(target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=target)
        for final in placed:
            with contextlib.suppress(OSError):
                os.unlink(final, dir_fd=target)
        raise
    for segment in set(old) - set(names):
        with contextlib.suppress(OSError):
            os.unlink(segment, dir_fd=target)
    for staged_segment, _ in playlist.segments:
        with contextlib.suppress(OSError):
            os.unlink(staged_segment, dir_fd=source)
    with contextlib.suppress(OSError):
        os.unlink(staged, dir_fd=source)
    return names


@contextmanager
def atomic_playlist(target: Path, seconds: int, *, replace: bool = True) -> Iterator[Path]:
    """A temporary MP4 path in a private folder beside the playlist ``target``: when the
    block succeeds, the MP4 is cut into segments and the playlist and its segments are put in
    place (see :func:`place`); otherwise nothing beside ``target`` changes. A full disk is said
    in words, with the folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.stem}.", suffix=".part",
                                    dir=target.parent))
    try:
        try:
            source = staging / f"{target.stem}.mp4"
            yield source
            segment(source, staging / target.name, seconds)
            source.unlink()
            staged = os.open(staging, _DIR)
            try:
                folder = os.open(target.parent, _DIR)
                try:
                    place(staged, target.name, folder, target.name, replace=replace,
                          mode=file_mode())
                finally:
                    os.close(folder)
            finally:
                os.close(staged)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise MelterError(f"no space left on device at {target.parent} (writing "
                                  f"{target.name})") from None
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["Playlist", "atomic_playlist", "free_stem", "named_after", "parse_playlist", "place",
           "read_playlist", "segment", "segment_name"]
