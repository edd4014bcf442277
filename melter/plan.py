"""Meeting + layout → scene plan: who sits in which rectangle during which interval.

Pure: data in, data out, no I/O — so any number of meetings can be planned in a property test
without rendering. Times are microseconds from the meeting's start.

Tiles stay stable: cells are filled in the order participants joined, so the grid changes only
when someone joins or leaves (or a time rule changes the layout); a speaker switch moves only
the speaker region's occupant.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from melter.layout.model import Layout, Region, parse_length, parse_time

#: A stretch without video frames at least this long shows the placeholder card.
VIDEO_OFF_US = 2_000_000


@dataclass(frozen=True)
class Span:
    start_us: int
    end_us: int


@dataclass(frozen=True)
class SegmentInfo:
    """What the planner needs of one publishing session (meeting-relative times)."""

    id: str
    start_us: int
    end_us: int
    has_audio: bool
    video_spans: tuple[Span, ...] = ()
    width: int = 0
    height: int = 0


@dataclass(frozen=True)
class ParticipantInfo:
    id: str
    display: str
    kind: str
    segments: tuple[SegmentInfo, ...]


@dataclass(frozen=True)
class SpeakerChange:
    at_us: int
    participant: str | None


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class Placement:
    participant: str
    display: str
    segment: str
    region: str
    rect: Rect  # the cell
    z: int
    fit: str
    video: bool  # False: the placeholder card is shown
    source_width: int = 0
    source_height: int = 0

    @property
    def content(self) -> Rect:
        """Where the picture lands: the cell (crop) or the fitted box inside it (letterbox)."""
        if not self.video or self.fit == "crop" or not self.source_width:
            return self.rect
        scale = min(self.rect.width / self.source_width, self.rect.height / self.source_height)
        width = max(2, round(self.source_width * scale))
        height = max(2, round(self.source_height * scale))
        return Rect(
            self.rect.x + (self.rect.width - width) // 2,
            self.rect.y + (self.rect.height - height) // 2,
            width,
            height,
        )


@dataclass
class Scene:
    start_us: int
    end_us: int
    placements: list[Placement]
    audio: dict[str, float]  # segment id -> gain
    speaker: str | None = None
    layout: str = ""


@dataclass
class Plan:
    width: int
    height: int
    fps: int
    background: str
    duration_us: int
    scenes: list[Scene]
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "canvas": {"width": self.width, "height": self.height, "fps": self.fps,
                       "background": self.background},
            "duration_s": round(self.duration_us / 1e6, 3),
            "scenes": [
                {
                    "start_s": round(s.start_us / 1e6, 3),
                    "end_s": round(s.end_us / 1e6, 3),
                    "layout": s.layout,
                    "speaker": s.speaker,
                    "placements": [
                        {
                            "participant": p.participant,
                            "display": p.display,
                            "segment": p.segment,
                            "region": p.region,
                            "cell": [p.rect.x, p.rect.y, p.rect.width, p.rect.height],
                            "content": [p.content.x, p.content.y, p.content.width,
                                        p.content.height],
                            "fit": p.fit,
                            "video": p.video,
                            "z": p.z,
                        }
                        for p in s.placements
                    ],
                    "audio": s.audio,
                }
                for s in self.scenes
            ],
            "warnings": self.warnings,
        }


def _matches(patterns: Sequence[str], participant: ParticipantInfo) -> bool:
    return any(
        fnmatch.fnmatchcase(participant.id, p) or fnmatch.fnmatchcase(participant.display, p)
        for p in patterns
    )


def grid_shape(count: int, width: int, height: int, max_rows: int, max_columns: int,
               aspect: float = 16 / 9) -> tuple[int, int]:
    """Rows and columns that give each of ``count`` tiles the largest picture of ``aspect``."""
    best = (1, 1)
    best_area = -1.0
    for columns in range(1, max_columns + 1):
        rows = math.ceil(count / columns)
        if rows > max_rows:
            continue
        cell_w, cell_h = width / columns, height / rows
        area = min(cell_w, cell_h * aspect) * min(cell_h, cell_w / aspect)
        if area > best_area * (1 + 1e-9) + 1e-9:
            best, best_area = (rows, columns), area
    if best_area < 0:
        return max_rows, max_columns
    return best


def _cells(
    region: Region, count: int, canvas_w: int, canvas_h: int, aspect: float = 16 / 9
) -> list[Rect]:
    x = parse_length(region.x, canvas_w)
    y = parse_length(region.y, canvas_h)
    width = parse_length(region.width, canvas_w)
    height = parse_length(region.height, canvas_h)
    max_rows = region.max_rows or 16
    max_columns = region.max_columns or 16
    excluded = set(region.cells_excluded)
    needed = count + len(excluded)
    rows, columns = grid_shape(max(1, needed), width, height, max_rows, max_columns, aspect)
    pad = region.padding
    cells = []
    for index in range(rows * columns):
        if index in excluded:
            continue
        row, column = divmod(index, columns)
        # Centre a short last row.
        in_row = min(columns, max(0, needed - row * columns))
        shift = (columns - in_row) * width // (2 * columns) if row == rows - 1 else 0
        x0 = x + shift + column * width // columns
        y0 = y + row * height // rows
        x1 = x + shift + (column + 1) * width // columns
        y1 = y + (row + 1) * height // rows
        cell_w = (x1 - x0 - pad) // 2 * 2
        cell_h = (y1 - y0 - pad) // 2 * 2
        cells.append(Rect(x0 + pad // 2, y0 + pad // 2, max(2, cell_w), max(2, cell_h)))
    return cells


def capacity(region: Region) -> int:
    return (region.max_rows or 16) * (region.max_columns or 16) - len(region.cells_excluded)


def build_plan(
    participants: Sequence[ParticipantInfo],
    duration_us: int,
    layout: Layout,
    speakers: Sequence[SpeakerChange] = (),
    layouts: dict[str, Layout] | None = None,
) -> Plan:
    """The scene plan. ``layouts`` resolves rule layouts by name (built-ins by the caller)."""
    layouts = layouts or {}
    canvas = layout.canvas
    plan = Plan(canvas.width, canvas.height, canvas.fps, canvas.background, duration_us, [])
    if not any(_matches(r.sources, p) for r in layout.regions for p in participants):
        plan.warnings.append(
            f"layout {layout.name!r} selects none of the participants "
            f"({', '.join(p.display for p in participants)}): only the background is drawn"
        )
    for rule in layout.rules:
        if rule.layout and rule.layout not in layouts:
            plan.warnings.append(f"rule layout {rule.layout!r} is unknown; the rule is ignored")

    frame_us = 1_000_000 / canvas.fps
    # The output has whole frames: the span rounded to the frame grid (as every boundary is).
    end_us = round(max(1, round(duration_us / frame_us)) * frame_us)
    bounds = {0, end_us}
    for participant in participants:
        for segment in participant.segments:
            bounds.update((segment.start_us, segment.end_us))
            for span in segment.video_spans:
                bounds.update((span.start_us, span.end_us))
    for rule in layout.rules:
        for value in (rule.start, rule.end):
            if value is not None:
                bounds.add(round(parse_time(value) * 1e6))
    for change in speakers:
        bounds.add(change.at_us)
    # Changes happen on output frames: snap every boundary to the frame grid, so no scene is
    # shorter than a frame and tests can check times to within one frame.
    times = sorted({min(end_us, round(round(t / frame_us) * frame_us))
                    for t in bounds if 0 <= t <= end_us})

    def speaker_at(t: int) -> str | None:
        current = None
        for change in speakers:
            if change.at_us > t:
                break
            current = change.participant
        return current

    scenes: list[Scene] = []
    for start, end in itertools.pairwise(times):
        if end <= start:
            continue
        mid = (start + end) // 2
        present: list[tuple[int, ParticipantInfo, SegmentInfo]] = []
        for participant in participants:
            for segment in participant.segments:
                if segment.start_us <= mid < segment.end_us:
                    present.append((segment.start_us, participant, segment))
        present.sort(key=lambda item: (item[0], item[1].id))
        regions, name, pin = _effective(layout, layouts, present, mid)
        speaker = speaker_at(mid)
        if pin is not None:
            pinned = next((p.id for _, p, _ in present if _matches([pin], p)), None)
            speaker = pinned or speaker
        placements = _place(regions, present, speaker, mid, canvas.width, canvas.height)
        audio = {
            segment.id: 1.0
            for _, participant, segment in present
            if segment.has_audio and _matches(layout.audio_sources, participant)
        }
        scene = Scene(start, end, placements, audio, speaker, name)
        if scenes and scenes[-1].placements == placements and scenes[-1].audio == audio \
                and scenes[-1].layout == name:
            scenes[-1].end_us = end
        else:
            scenes.append(scene)
    plan.scenes = scenes
    return plan


def _effective(
    layout: Layout,
    layouts: dict[str, Layout],
    present: list[tuple[int, ParticipantInfo, SegmentInfo]],
    t: int,
) -> tuple[list[Region], str, str | None]:
    """The regions in force at ``t`` after the layout's rules (later rules win)."""
    regions, name, pin = list(layout.regions), layout.name, None
    screen_share = any(p.kind == "screen" for _, p, _ in present)
    for rule in layout.rules:
        if rule.when == "screen_share" and not screen_share:
            continue
        if rule.start is not None and t < parse_time(rule.start) * 1e6:
            continue
        if rule.end is not None and t >= parse_time(rule.end) * 1e6:
            continue
        if rule.layout and rule.layout in layouts:
            regions, name = list(layouts[rule.layout].regions), rule.layout
        if rule.regions:
            regions, name = list(rule.regions), f"{layout.name}+rule"
        if rule.pin:
            pin = rule.pin
    return regions, name, pin


def _has_video(segment: SegmentInfo, t: int) -> bool:
    return any(span.start_us <= t < span.end_us for span in segment.video_spans)


def _place(
    regions: list[Region],
    present: list[tuple[int, ParticipantInfo, SegmentInfo]],
    speaker: str | None,
    t: int,
    canvas_w: int,
    canvas_h: int,
) -> list[Placement]:
    placed: set[str] = set()
    placements: list[Placement] = []
    order = sorted(regions, key=lambda r: {"speaker": 0, "grid": 1, "others": 2}[r.role])
    # The speaker region falls back to the first present participant before anyone speaks.
    fallback = next((p.id for _, p, _ in present if p.kind == "camera"), None)
    for region in order:
        candidates = [
            (p, s) for _, p, s in present
            if p.id not in placed
            and p.kind in region.kinds
            and _matches(region.sources, p)
            and not _matches(region.sources_excluded, p)
        ]
        if region.role == "speaker":
            chosen = speaker if speaker in {p.id for p, _ in candidates} else fallback
            candidates = [(p, s) for p, s in candidates if p.id == chosen][:1]
        elif region.role == "others":
            candidates = [(p, s) for p, s in candidates if p.id != speaker]
        limit = capacity(region)
        if len(candidates) > limit:
            newest = region.reuse == "show_newest"
            candidates = candidates[-limit:] if newest else candidates[:limit]
        if not candidates:
            continue
        sized = [s for _, s in candidates if s.width and s.height]
        aspect = (sum(s.width / s.height for s in sized) / len(sized)) if sized else 16 / 9
        cells = _cells(region, len(candidates), canvas_w, canvas_h, aspect)
        for (participant, segment), cell in zip(candidates, cells, strict=False):
            placed.add(participant.id)
            video = region.show_video and _has_video(segment, t)
            placements.append(
                Placement(
                    participant.id, participant.display, segment.id, region.name, cell,
                    region.z, region.fit, video, segment.width, segment.height,
                )
            )
    placements.sort(key=lambda p: p.z)
    return placements
