"""Replay a recorded meeting live: its MJR files grow as Janus wrote them, its events arrive as
Janus posted them.

Progressive rendering, the watcher and the event service are only believable when they see a
meeting happen, and a real Janus meeting cannot be repeated. Every MJR00002 frame carries its
arrival time and every event its timestamp, so the meeting can be played again at its own pace:
each file appears at its creation time, each packet is appended when it arrived, each event is
posted when it was sent. The whole meeting is moved to now (file names, header times and event
timestamps alike), because receivers judge times against their own clock; the packets
themselves are copied unchanged.

Frames are read lazily from each file and merged by time, so memory stays flat whatever the
meeting's length.
"""

from __future__ import annotations

import base64
import heapq
import json
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from melter.errors import InputError, MelterError
from melter.meeting import VIDEOROOM
from melter.mjr.reader import MjrReader, Variant

#: Events whose times are this close are posted together, as Janus's handler groups them.
GROUP_US = 50_000
#: A POST that takes longer than this counts as failed; the replay goes on.
POST_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ReplayFile:
    """One recording and where its replay goes."""

    source: Path
    target_name: str
    header: bytes  # the rewritten header, written when the file is created
    created_us: int  # original time of creation (header ``s``, else the file name's stamp)


@dataclass
class ReplayPlan:
    """What to write and post, and by how much every time moves."""

    files: list[ReplayFile]
    events: list[tuple[int, dict[str, Any]]]  # (original µs, event) in time order
    start_us: int  # the earliest original time
    end_us: int  # the latest original time (last packet or event)
    shift_us: int = 0


@dataclass
class ReplayReport:
    files: int = 0
    frames: int = 0
    bytes: int = 0
    posts: int = 0
    events: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    max_late_s: float = 0.0
    elapsed_s: float = 0.0


def _rename(name: str, room: str | None, shift_us: int) -> str:
    """The replayed file's name: the same participant and kind, the new room and time."""
    stem = name.removesuffix(".mjr")
    match = VIDEOROOM.match(stem)
    if match is None:
        return name
    tail = stem[match.end("stamp"):]
    return (f"videoroom-{room if room is not None else match['room']}-user-{match['user']}-"
            f"{int(match['stamp']) + shift_us}{tail}.mjr")


def _header_bytes(reader: MjrReader, shift_us: int) -> bytes:
    header = reader.header
    if header.variant is Variant.LEGACY:
        with reader.path.open("rb") as handle:
            return handle.read(header.frames_offset)
    info = dict(header.raw)
    for key in ("s", "u"):
        if isinstance(info.get(key), int):
            info[key] += shift_us
    body = json.dumps(info, separators=(",", ":")).encode()
    return header.variant.value.encode() + len(body).to_bytes(2, "big") + body


def _read_events(path: Path) -> list[tuple[int, dict[str, Any]]]:
    events = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read events ({exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"line {number} is not JSON ({exc.msg})") from None
        stamp = event.get("timestamp") if isinstance(event, dict) else None
        if not isinstance(stamp, int):
            raise InputError(path, f"line {number} has no integer timestamp")
        events.append((stamp, event))
    events.sort(key=lambda item: item[0])
    return events


def plan_replay(meeting: Path, room: str | None = None) -> ReplayPlan:
    """Read a meeting folder (MJR files, and ``events.jsonl`` if present) for a replay."""
    sources = sorted(p for p in meeting.iterdir() if p.suffix == ".mjr" and p.is_file())
    if not sources:
        raise InputError(meeting, "no .mjr recordings in this folder")
    events_file = meeting / "events.jsonl"
    events = _read_events(events_file) if events_file.exists() else []
    files = []
    times = [stamp for stamp, _ in events]
    ends = list(times)
    for source in sources:
        reader = MjrReader(source)
        match = VIDEOROOM.match(source.stem)
        created = reader.header.created_us
        if created is None:
            created = int(match["stamp"]) if match else int(source.stat().st_mtime * 1e6)
        files.append(ReplayFile(source, source.name, b"", created))
        times.append(created)
        last_ms = 0
        for frame in reader.frames():
            last_ms = frame.arrival_ms or last_ms
        ends.append(created + last_ms * 1000)
    return ReplayPlan(files, events, min(times), max(ends))


def shifted(plan: ReplayPlan, now_us: int, room: str | None = None) -> ReplayPlan:
    """The plan moved so that it starts at ``now_us`` (whole seconds), into ``room``."""
    shift = (now_us - plan.start_us) // 1_000_000 * 1_000_000
    files = [ReplayFile(f.source, _rename(f.source.name, room, shift),
                        _header_bytes(MjrReader(f.source), shift), f.created_us)
             for f in plan.files]
    events = []
    for stamp, event in plan.events:
        moved = json.loads(json.dumps(event))
        moved["timestamp"] = stamp + shift
        data = moved.get("event", {}).get("data") if isinstance(moved.get("event"), dict) else None
        if room is not None and isinstance(data, dict) and "room" in data:
            data["room"] = int(room) if room.isdigit() else room
        events.append((stamp, moved))
    return ReplayPlan(files, events, plan.start_us, plan.end_us, shift)


def _frames(file: ReplayFile, order: int) -> Iterator[tuple[int, int, int, bytes]]:
    """(original µs, file order, frame order, stored bytes) of one file, lazily."""
    reader = MjrReader(file.source)
    for number, frame in enumerate(reader.frames()):
        arrival = frame.arrival_ms if frame.arrival_ms is not None else 0
        if reader.header.variant is Variant.V2:
            prefix = b"MEET" + (arrival & 0xFFFF_FFFF).to_bytes(4, "big")
        else:
            prefix = b"MEETECHO"
        yield (file.created_us + arrival * 1000, order, number,
               prefix + len(frame.data).to_bytes(2, "big") + frame.data)


def event_poster(url: str, user: str | None = None, password: str | None = None,
                 token: str | None = None) -> Callable[[list[dict[str, Any]]], str]:
    """POST a group of events as Janus's HTTP event handler does; the status (or the error)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif user:
        pair = f"{user}:{password or ''}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()

    def post(events: list[dict[str, Any]]) -> str:
        body = json.dumps(events if len(events) > 1 else events[0]).encode()
        request = urllib.request.Request(url, body, headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=POST_TIMEOUT_S) as response:
                return str(response.status)
        except urllib.error.HTTPError as exc:
            return str(exc.code)
        except (urllib.error.URLError, OSError) as exc:
            return type(exc).__name__

    return post


def replay(plan: ReplayPlan, into: Path, post: Callable[[list[dict[str, Any]]], str] | None,
           speed: float = 1.0, clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep,
           progress: Callable[[ReplayReport, float], None] | None = None,
           split_writes: bool = False, split_seed: int = 0) -> ReplayReport:
    """Write the plan's files into ``into`` and post its events, each at its own time.

    ``speed`` above 1 plays faster than the meeting happened (the bytes written are the same).
    ``split_writes`` writes as a buffered writer that flushes at arbitrary byte boundaries: each
    frame reaches the file in two pieces, cut at a (``split_seed``) pseudo-random byte inside
    it; the first piece is flushed at the frame's time, the rest with the file's next frame (or
    when the replay ends), so a reader meanwhile finds a partly written last frame.
    Existing files are never overwritten: a replay into a folder that already holds one of its
    names stops before writing anything.
    """
    if speed <= 0:
        raise MelterError("replay speed must be above 0")
    into.mkdir(parents=True, exist_ok=True)
    for file in plan.files:
        if (into / file.target_name).exists():
            raise InputError(into / file.target_name, "already exists; replay into another "
                             "folder or room")
    report = ReplayReport()
    handles: dict[int, IO[bytes]] = {}
    pending: dict[int, bytes] = {}
    cuts = random.Random(split_seed)
    frames = heapq.merge(*(_frames(f, k) for k, f in enumerate(plan.files)))
    opens = sorted((f.created_us, k) for k, f in enumerate(plan.files))
    groups: list[tuple[int, list[dict[str, Any]]]] = []
    for stamp, event in plan.events:
        if groups and stamp - groups[-1][0] <= GROUP_US:
            groups[-1][1].append(event)
        else:
            groups.append((stamp, [event]))
    started = clock()
    last_report = started

    def wait_for(original_us: int) -> None:
        nonlocal last_report
        due = started + (original_us - plan.start_us) / 1e6 / speed
        delay = due - clock()
        if delay > 0:
            sleep(delay)
        else:
            report.max_late_s = max(report.max_late_s, -delay)
        if progress is not None and clock() - last_report >= 10:
            last_report = clock()
            progress(report, last_report - started)

    def flush() -> None:
        for handle in handles.values():
            handle.flush()

    next_frame = next(frames, None)
    open_index = event_index = 0
    try:
        while next_frame is not None or open_index < len(opens) or event_index < len(groups):
            candidates = []
            if open_index < len(opens):
                candidates.append((opens[open_index][0], 0))
            if event_index < len(groups):
                candidates.append((groups[event_index][0], 1))
            if next_frame is not None:
                candidates.append((next_frame[0], 2))
            when, kind = min(candidates)
            wait_for(when)
            if kind == 0:
                k = opens[open_index][1]
                open_index += 1
                file = plan.files[k]
                fd = os.open(into / file.target_name,
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                handles[k] = os.fdopen(fd, "wb")
                handles[k].write(file.header)
                handles[k].flush()
                report.files += 1
            elif kind == 1:
                flush()
                batch = groups[event_index][1]
                event_index += 1
                if post is not None:
                    status = post(batch)
                    report.posts += 1
                    report.events += len(batch)
                    report.statuses[status] = report.statuses.get(status, 0) + 1
            else:
                assert next_frame is not None
                _, k, _, data = next_frame
                if k in handles:
                    if split_writes:
                        cut = cuts.randrange(1, len(data))
                        handles[k].write(pending.pop(k, b"") + data[:cut])
                        pending[k] = data[cut:]
                    else:
                        handles[k].write(data)
                    report.frames += 1
                    report.bytes += len(data)
                next_frame = next(frames, None)
                if next_frame is None or next_frame[0] != when:
                    flush()
    finally:
        for k, handle in handles.items():
            if k in pending:
                handle.write(pending.pop(k))
            handle.close()
    report.elapsed_s = clock() - started
    return report
