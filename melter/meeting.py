"""A meeting: who took part, and when, on the Janus host's wall clock.

Files are grouped into participants by the names Janus's plugins give them (VideoRoom:
``videoroom-<room>-user-<id>-<µs>-<kind>-<mindex>.mjr``; Record&Play: ``rec-<id>-<kind>.mjr``),
else by the header's stream description, else by the file name without its kind. A participant
is a list of *segments* — one per publishing session, so a leave-and-rejoin gives two — each
with its audio and video tracks. An optional ``meeting.yaml`` beside the files names
participants, sets display names and marks screen shares; a Janus events file
(``events.jsonl``) gives display names too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from melter.errors import InputError, MelterError
from melter.limits import check_meeting_span, check_recording_span
from melter.mjr.reader import EmptyRecordingError, MjrReader
from melter.rooted import file_problem
from melter.track import TrackAnalysis, analyze

VIDEOROOM = re.compile(
    r"^videoroom-(?P<room>[^-]+)-user-(?P<user>[^-]+)-(?P<stamp>\d+)-(?P<kind>audio|video|data)"
    r"(?:-(?P<mindex>\d+))?$"
)
RECORDPLAY = re.compile(r"^rec-(?P<user>[^-]+)-(?P<kind>audio|video|data)$")
KIND_SUFFIX = re.compile(r"[-_.](audio|video|data)(?:[-_]\d+)?$")
#: Two files of one publisher belong to the same segment when their spans overlap or touch
#: within this much.
SEGMENT_JOIN_US = 2_000_000


class ParticipantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    display: str | None = None
    kind: str | None = Field(default=None, pattern="^(camera|screen)$")
    files: list[str] = Field(default_factory=list, description="globs of files that belong here")


class MeetingConfig(BaseModel):
    """The optional ``meeting.yaml`` sidecar."""

    model_config = ConfigDict(extra="forbid")
    room: str | None = None
    participants: dict[str, ParticipantConfig] = Field(default_factory=dict)


@dataclass
class Segment:
    """One publishing session of a participant."""

    participant: str
    index: int
    audio: TrackAnalysis | None = None
    video: TrackAnalysis | None = None

    @property
    def tracks(self) -> list[TrackAnalysis]:
        return [t for t in (self.audio, self.video) if t is not None]

    @property
    def start_us(self) -> int:
        return min(t.start_us for t in self.tracks)

    @property
    def end_us(self) -> int:
        return max(t.end_us for t in self.tracks)

    @property
    def id(self) -> str:
        return f"{self.participant}#{self.index}"


@dataclass
class Participant:
    id: str
    display: str
    kind: str = "camera"  # camera | screen
    room: str | None = None
    segments: list[Segment] = field(default_factory=list)
    joined_order: int = 0

    @property
    def has_video(self) -> bool:
        return any(s.video is not None for s in self.segments)

    @property
    def start_us(self) -> int:
        return min(s.start_us for s in self.segments)

    @property
    def end_us(self) -> int:
        return max(s.end_us for s in self.segments)


@dataclass
class Meeting:
    room: str | None
    participants: list[Participant]
    skipped: list[str] = field(default_factory=list)

    @property
    def start_us(self) -> int:
        return min(p.start_us for p in self.participants)

    @property
    def end_us(self) -> int:
        return max(p.end_us for p in self.participants)

    @property
    def duration_us(self) -> int:
        return self.end_us - self.start_us

    def participant(self, pid: str) -> Participant:
        for participant in self.participants:
            if participant.id == pid:
                return participant
        raise KeyError(pid)


@dataclass
class _FileInfo:
    path: Path
    room: str | None
    user: str
    kind: str
    analysis: TrackAnalysis


def _identify(path: Path, reader: MjrReader) -> tuple[str | None, str, str]:
    stem = path.name.removesuffix(".mjr")
    match = VIDEOROOM.match(stem)
    if match:
        return match["room"], match["user"], match["kind"]
    match = RECORDPLAY.match(stem)
    if match:
        return None, match["user"], match["kind"]
    kind = reader.header.kind
    if reader.header.description:
        return None, reader.header.description, kind
    return None, KIND_SUFFIX.sub("", stem), kind


def load_config(folder: Path) -> MeetingConfig:
    for name in ("meeting.yaml", "meeting.yml"):
        path = folder / name
        if path.exists():
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise InputError(path, f"not valid YAML ({exc})") from None
            try:
                return MeetingConfig.model_validate(data)
            except ValidationError as exc:
                raise InputError(path, _pydantic_message(exc)) from None
    return MeetingConfig()


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def display_names_from_events(path: Path) -> dict[tuple[str, str], str]:
    """``{(room, publisher id): display}`` from VideoRoom events in a Janus events file."""
    names: dict[tuple[str, str], str] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise InputError(path, exc.strerror or str(exc)) from None
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            item: Any = json.loads(line)
        except json.JSONDecodeError:
            continue
        for event in item if isinstance(item, list) else [item]:
            data = (event.get("event") or {}).get("data") if isinstance(event, dict) else None
            if isinstance(data, dict) and data.get("display") and data.get("id") is not None:
                names[(str(data.get("room")), str(data["id"]))] = str(data["display"])
    return names


def discover(
    inputs: Iterable[Path], room: str | None = None, events: Path | None = None,
    root: Path | None = None,
) -> Meeting:
    """Group recordings into a meeting's participants and their segments.

    With ``root`` (the farm's storage root), a recording whose real path lies outside it, or
    that is not a regular file, is skipped, and such a meeting or events file is refused: a
    link planted in an input folder must not make the worker read elsewhere (or block on a
    FIFO)."""
    inputs = list(inputs)
    paths: list[Path] = []
    folder: Path | None = None
    for item in inputs:
        if item.is_dir():
            folder = folder or item
            paths.extend(sorted(item.glob("*.mjr")))
        elif item.exists():
            paths.append(item)
        else:
            raise InputError(item, "no such file or folder")
    if not paths:
        raise MelterError("no .mjr recordings found in " + ", ".join(str(p) for p in inputs))
    skipped: list[str] = []
    if root is not None:
        for meeting_file in ("meeting.yaml", "meeting.yml", "events.jsonl"):
            candidate = (folder or paths[0].parent) / meeting_file
            if candidate.exists() or candidate.is_symlink():
                problem = file_problem(candidate, root)
                if problem is not None:
                    raise InputError(candidate, problem)
        kept = []
        for path in paths:
            problem = file_problem(path, root)
            if problem is None:
                kept.append(path)
            else:
                skipped.append(f"{path}: {problem} (skipped)")
        paths = kept
        if not paths:
            raise MelterError("no usable recordings; " + "; ".join(skipped))
    config = load_config(folder or paths[0].parent)
    if events is None and folder is not None and (folder / "events.jsonl").exists():
        events = folder / "events.jsonl"
    names = display_names_from_events(events) if events else {}
    room = room or config.room
    infos: list[_FileInfo] = []
    rooms: set[str] = set()
    for path in paths:
        try:
            reader = MjrReader(path)
            file_room, user, kind = _identify(path, reader)
            if file_room is not None:
                rooms.add(file_room)
            if room is not None and file_room is not None and file_room != room:
                continue
            if kind == "data":
                continue
            analysis = analyze(path)
            check_recording_span(path, analysis.start_us, analysis.end_us)
            infos.append(_FileInfo(path, file_room, user, kind, analysis))
        except EmptyRecordingError as exc:
            skipped.append(f"{exc} (skipped)")
        except InputError as exc:
            skipped.append(f"{exc} (skipped)")
    if room is None and len(rooms) > 1:
        raise MelterError(
            f"recordings of {len(rooms)} rooms ({', '.join(sorted(rooms))}): pick one with --room"
        )
    if not infos:
        raise MelterError("no usable recordings" + (f" in room {room}" if room else "")
                          + ("; " + "; ".join(skipped) if skipped else ""))
    # Files named in meeting.yaml belong to the participant that names them.
    for pid, cfg in config.participants.items():
        for info in infos:
            if any(info.path.match(pattern) for pattern in cfg.files):
                info.user = pid
    by_user: dict[str, list[_FileInfo]] = {}
    for info in infos:
        by_user.setdefault(info.user, []).append(info)
    participants = []
    for user, files in by_user.items():
        files.sort(key=lambda f: f.analysis.start_us)
        segments: list[Segment] = []
        for info in files:
            current = segments[-1] if segments else None
            fits = (
                current is not None
                and getattr(current, info.kind) is None
                and info.analysis.start_us <= current.end_us + SEGMENT_JOIN_US
            )
            if not fits:
                current = Segment(user, len(segments))
                segments.append(current)
            assert current is not None
            setattr(current, info.kind, info.analysis)
        cfg = config.participants.get(user, ParticipantConfig())
        file_room = files[0].room
        display = cfg.display or names.get((str(file_room), user)) or user
        kind = cfg.kind or ("screen" if "screen" in display.lower() else "camera")
        participants.append(Participant(user, display, kind, file_room, segments))
    participants.sort(key=lambda p: (p.start_us, p.id))
    for order, participant in enumerate(participants):
        participant.joined_order = order
    check_meeting_span(min(p.start_us for p in participants),
                       max(p.end_us for p in participants))
    return Meeting(room or (next(iter(rooms)) if len(rooms) == 1 else None), participants, skipped)
