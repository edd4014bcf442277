"""A meeting planned while Janus still writes it is planned as the final meeting will be.

Progressive rendering renders closed windows of a meeting from its recordings as they stand so
far. For that, the plan made from every file cut at one wall time ``T`` (each file holding the
frames that had arrived by then, the last one perhaps half written) must equal the plan of the
whole meeting up to ``T - PLAN_HORIZON_S``: the same scenes, starting and ending on the same
microsecond, with the same placements, audio and speaker, and the same speaker changes.

Checked on every real meeting in ``tests/fixtures`` and on generated ones with turns, skewed
and jittery clocks, joins, leaves, a rejoin, a screen share, a video pause, a resolution change,
a clock jump and a sender change, for the built-in ``grid`` and ``speaker`` layouts.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from melter.compose import PLAN_HORIZON_S
from melter.layout.model import Speaker, load_layout
from melter.layout.speaker import LevelTrack, speaker_timeline
from melter.plan import Plan, SpeakerChange
from melter.render import RenderPlan, plan_render
from melter.track import STABLE_AFTER_S
from tests.helpers.mjrwriter import (
    T0_US,
    URI_AUDIO_LEVEL,
    Stream,
    audio_level_value,
    vp8_pictures,
)
from tests.helpers.prefixes import arrivals, cut_at

FIXTURES = Path(__file__).parent.parent / "fixtures"
MEETINGS = sorted(path.parent for path in FIXTURES.glob("*/events.jsonl"))
#: Where the meetings are cut, as fractions of their span of arrivals.
CUTS = (0.2, 0.35, 0.5, 0.65, 0.8)
LAYOUTS = ("grid", "speaker")
ROOM = "7310"
#: Payload of the generated audio: a CELT 20 ms frame as DTX senders emit (only its TOC and
#: the packets' levels matter to a plan).
CELT = bytes((0xF8, 0xFF, 0xFE))
#: RFC 6464 levels (-dBov) of a speaking and of a quiet participant.
LOUD_DBOV, QUIET_DBOV = 14, 60
VIDEO_FPS = 5

pytestmark = pytest.mark.timeout(300)


@dataclass(frozen=True)
class Session:
    """One publishing session of a generated participant (meeting seconds)."""

    uid: str
    start: float
    end: float
    turns: tuple[tuple[float, float], ...] = ()
    ppm: float = 0.0
    jitter_ms: float = 0.0
    audio: bool = True
    #: No pictures in this span; the RTP clock runs on (Janus rewrites it).
    video_pause: tuple[float, float] | None = None
    #: From this time the pictures are twice as large.
    larger_at: float | None = None
    #: The sender stops its audio clock for this long at ``clock_jump[0]`` (a clock piece).
    clock_jump: tuple[float, float] | None = None
    #: A new sender (SSRC, sequence, timestamps) from this time on, as after a renegotiation.
    new_sender_at: float | None = None

    def level(self, t: float) -> int:
        return LOUD_DBOV if any(a <= t < b for a, b in self.turns) else QUIET_DBOV


def _audio(session: Session, number: int) -> Stream:
    first = T0_US + round(session.start * 1e6)
    count = round((session.end - session.start) * 50)
    stream = Stream.audio([CELT] * count, 960, start_us=first, ssrc=0x1100 + number)
    stream.extension(1, lambda p: audio_level_value(session.level(session.start + p.index / 50)),
                     uri=URI_AUDIO_LEVEL)
    if session.new_sender_at is not None:
        at = round((session.new_sender_at - session.start) * 50)
        stream.ssrc_change(at, 0x1900 + number, seq=4000, ts=123_456_789)
    if session.clock_jump is not None:
        at, length = session.clock_jump
        stream.pause(round((at - session.start) * 50), length, ts_runs=False)
    return _network(stream, session, number)


def _video(session: Session, number: int) -> Stream:
    first = T0_US + round(session.start * 1e6)
    small = vp8_pictures(VIDEO_FPS, (160, 90), fps=VIDEO_FPS, gop=VIDEO_FPS)
    large = vp8_pictures(VIDEO_FPS, (320, 180), fps=VIDEO_FPS, gop=VIDEO_FPS)
    pictures, ticks = [], []
    for n in range(round((session.end - session.start) * VIDEO_FPS)):
        t = session.start + n / VIDEO_FPS
        if session.video_pause is not None and session.video_pause[0] <= t < session.video_pause[1]:
            continue
        group = large if session.larger_at is not None and t >= session.larger_at else small
        pictures.append(group[n % VIDEO_FPS] if pictures else group[0])
        ticks.append(n * 90000 // VIDEO_FPS)
    stream = Stream.vp8(pictures, start_us=first, ssrc=0x2200 + number, ticks=ticks)
    return _network(stream, session, number)


def _network(stream: Stream, session: Session, number: int) -> Stream:
    if session.ppm:
        stream.skew(session.ppm)
    if session.jitter_ms:
        stream.jitter(random.Random(number), session.jitter_ms)
    return stream


def write_sessions(folder: Path, sessions: Sequence[Session]) -> Path:
    """VideoRoom-named recordings of ``sessions``."""
    folder.mkdir(parents=True, exist_ok=True)
    for number, session in enumerate(sessions):
        stamp = T0_US + round(session.start * 1e6)
        name = f"videoroom-{ROOM}-user-{session.uid}-{stamp}"
        if session.audio:
            _audio(session, number).write(folder / f"{name}-audio-0.mjr")
        _video(session, number).write(folder / f"{name + '1'}-video-1.mjr")
    return folder


#: Turn-taking among three cameras and a screen share, with every clock trouble a plan meets.
BUSY = (
    Session("anna", 0.0, 96.0, turns=((2, 19), (48, 63), (88, 95)), ppm=60, jitter_ms=15,
            larger_at=40.0),
    Session("ben", 4.0, 70.0, turns=((19.5, 34), (63.5, 69)), ppm=-45, jitter_ms=5,
            video_pause=(28.0, 36.0)),
    Session("cleo", 11.0, 45.0, turns=((34.5, 44),), jitter_ms=30),
    Session("cleo", 52.0, 96.0, turns=((70, 87),), ppm=25, jitter_ms=10),
    Session("screen9", 58.0, 81.0, audio=False),
)
#: Two people, one whose sender stops its clock and one whose sender is replaced.
TROUBLED = (
    Session("dora", 0.0, 70.0, turns=((1, 30), (50, 69)), jitter_ms=8, clock_jump=(26.0, 4.0)),
    Session("emil", 3.0, 66.0, turns=((31, 49),), ppm=-120, jitter_ms=12, new_sender_at=37.0),
)
GENERATED = {"busy": BUSY, "troubled": TROUBLED}


@dataclass(frozen=True)
class ScenePart:
    """A scene clipped to a time, in a form compared whole."""

    start_us: int
    end_us: int
    placements: tuple[Any, ...]
    audio: tuple[tuple[str, float], ...]
    speaker: str | None
    layout: str


def clipped(plan: Plan, until_us: int) -> list[ScenePart]:
    return [ScenePart(scene.start_us, min(scene.end_us, until_us), tuple(scene.placements),
                      tuple(sorted(scene.audio.items())), scene.speaker, scene.layout)
            for scene in plan.scenes if scene.start_us < until_us]


def changes_before(changes: Sequence[SpeakerChange], until_us: int) -> list[SpeakerChange]:
    return [change for change in changes if change.at_us < until_us]


def plans(paths: Sequence[Path]) -> dict[str, RenderPlan]:
    """The meeting planned with each layout (discovered and analysed once)."""
    first = plan_render(list(paths), load_layout(LAYOUTS[0]))
    out = {LAYOUTS[0]: first}
    for name in LAYOUTS[1:]:
        out[name] = plan_render(first.meeting, load_layout(name))
    return out


def cut_meeting(folder: Path, at_us: int, into: Path, partial: int) -> list[Path]:
    """Every recording of ``folder`` as it stood at ``at_us`` (one not yet begun is absent),
    with the meeting's side files."""
    into.mkdir(parents=True, exist_ok=True)
    for side in ("events.jsonl", "meeting.yaml"):
        if (folder / side).exists():
            shutil.copy(folder / side, into / side)
    written = []
    for path in sorted(folder.glob("*.mjr")):
        prefix = cut_at(path, at_us, into / path.name, partial)
        if prefix is not None:
            written.append(prefix.path)
    return written


def assert_plans_stable(folder: Path, work: Path) -> dict[str, int]:
    """Cut the meeting at each of :data:`CUTS` and compare; what was compared, counted."""
    spans = [arrivals(path) for path in sorted(folder.glob("*.mjr"))]
    first = min(span.first_us for span in spans)
    last = max(span.last_us for span in spans)
    whole = plans(sorted(folder.glob("*.mjr")))
    origin = whole[LAYOUTS[0]].meeting.start_us
    counted = {"scenes": 0, "changes": 0}
    for number, fraction in enumerate(CUTS):
        at = first + round((last - first) * fraction)
        paths = cut_meeting(folder, at, work / f"cut{number}", partial=7 * (number % 2))
        grown = plans(paths)
        until = at - origin - round(PLAN_HORIZON_S * 1e6)
        for name in LAYOUTS:
            now, final = grown[name], whole[name]
            where = f"{folder.name} cut at {fraction:.0%}, layout {name}"
            assert now.meeting.start_us == origin, where
            assert clipped(now.plan, until) == clipped(final.plan, until), where
            assert changes_before(now.speakers, until) == changes_before(final.speakers,
                                                                         until), where
            counted["scenes"] += len(clipped(final.plan, until))
            counted["changes"] += len(changes_before(final.speakers, until))
    return counted


def test_the_horizons() -> None:
    """What the tests hold the model to: a few seconds each."""
    assert (STABLE_AFTER_S, PLAN_HORIZON_S) == (5.0, 8.0)


@pytest.mark.parametrize("folder", MEETINGS, ids=[m.name for m in MEETINGS])
def test_real_meeting_plans_are_stable(folder: Path, tmp_path: Path) -> None:
    counted = assert_plans_stable(folder, tmp_path)
    assert counted["scenes"] >= len(CUTS)
    if folder.name == "dev-turn-taking-vp8":
        assert counted["changes"] >= 5


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_meeting_plans_are_stable(name: str, tmp_path: Path) -> None:
    folder = write_sessions(tmp_path / "meeting", GENERATED[name])
    counted = assert_plans_stable(folder, tmp_path / "cuts")
    assert counted["scenes"] >= 3 * len(CUTS)
    assert counted["changes"] >= 6


@pytest.mark.parametrize("settings", [Speaker(), Speaker(hold=2.0, min_switch=3.0, window=0.5)],
                         ids=["defaults", "slow"])
def test_the_speaker_timeline_never_listens_ahead(settings: Speaker) -> None:
    """Levels known up to a window (and the meeting as long as that) give the final
    timeline's changes up to that window: hysteresis, hold and the switch interval all look
    back. Three talkers, 10 minutes of random turns, cut at every 53rd window."""
    window = round(settings.window * 1e6)
    rng = np.random.default_rng(5)
    steps = round(600e6 / window)
    tracks = []
    for row, name in enumerate(("a", "b", "c")):
        speaking = np.repeat(rng.random(steps // 20 + 1) < 0.4, 20)[:steps]
        levels = np.where(speaking, -12.0 - 5 * row, -60.0) + rng.normal(0, 4, steps)
        tracks.append(LevelTrack(name, 0, window, levels[: steps - 200 * row]))
    final = speaker_timeline(tracks, settings, steps * window)
    assert len(final) > 30
    for cut in range(1, steps, 53):
        grown = [LevelTrack(t.participant, 0, window, t.levels[:cut]) for t in tracks]
        now = speaker_timeline(grown, settings, cut * window)
        assert now == changes_before(final, cut * window), cut
