"""Layout rules, measured in rendered files: screen shares, pins and the active speaker.

Synthetic meetings are written with ``mjrwriter``: each participant sends one solid colour and
its own tone, so the colour of a pixel says who is shown there. Truth is what was written (or,
for the real turn-taking meeting, its manifest), never Melter's plan — except to know where a
region's picture lands.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
import yaml

from melter.compose import plan_meeting
from melter.layout.model import Layout, load_layout, parse_layout
from melter.meeting import Meeting, discover
from melter.plan import Plan, SpeakerChange
from melter.render import PRESETS, RenderResult, plan_render, render
from tests.helpers.mjrwriter import (
    T0_US,
    URI_AUDIO_LEVEL,
    Picture,
    Stream,
    audio_level_value,
    vp8_pictures,
)

FIXTURES = Path(__file__).parent.parent / "fixtures"
ROOM = "4242"
VIDEO_SIZE = (320, 240)
VIDEO_FPS = 15
#: Colour levels a solid picture may drift through VP8, scaling and H.264.
TOLERANCE = 30
#: RFC 6464 levels (-dBov) of a speaking and of a quiet participant.
LOUD_DBOV, QUIET_DBOV = 13, 55

RED = (200, 40, 40)
GREEN = (40, 160, 60)
BLUE = (40, 70, 200)


# -- synthetic meetings ----------------------------------------------------------------------
@dataclass(frozen=True)
class Person:
    """A synthetic participant; times are meeting seconds (0 = the writer's ``T0_US``)."""

    uid: str
    colour: tuple[int, int, int]
    tone: float
    start: float
    end: float
    #: Speaking spans (meeting seconds); None: speaking throughout.
    turns: tuple[tuple[float, float], ...] | None = None
    #: True: the packets carry RFC 6464 levels following ``turns`` while the tone itself stays
    #: loud (so only the extension tells the turns); False: no extension, and the tone is loud
    #: in turns and 40 dB quieter between them.
    levels: bool = False

    def speaks(self, t: float) -> bool:
        return self.turns is None or any(a <= t < b for a, b in self.turns)


def _opus_payloads(person: Person) -> list[bytes]:
    """Opus packets (20 ms, mono) of the person's tone, amplitude 0.3 or 0.003 between turns."""
    rate = 48000
    seconds = person.end - person.start
    t = np.arange(round((seconds + 0.1) * rate)) / rate
    if person.levels or person.turns is None:
        envelope = np.full(len(t), 0.3)
    else:
        loud = np.zeros(len(t), dtype=bool)
        for a, b in person.turns:
            loud |= (t >= a - person.start) & (t < b - person.start)
        envelope = np.where(loud, 0.3, 0.003)
        envelope = np.convolve(envelope, np.ones(480) / 480, mode="same")  # 10 ms ramps
    pcm = np.round(envelope * np.sin(2 * np.pi * person.tone * t) * 32767).astype(np.int16)
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = rate
    encoder.layout = "mono"
    encoder.format = "s16"
    encoder.options = {"frame_duration": "20", "application": "audio", "b": "32000"}
    encoder.open()
    packets: list[bytes] = []
    for pos in range(0, len(pcm) - 960 + 1, 960):
        frame = av.AudioFrame.from_ndarray(pcm[None, pos : pos + 960], format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = pos
        packets += [bytes(p) for p in encoder.encode(frame)]
    packets += [bytes(p) for p in encoder.encode(None)]
    count = round(seconds * 50)
    assert len(packets) >= count
    return packets[:count]


def _pictures(colour: tuple[int, int, int], count: int) -> list[Picture]:
    """``count`` VP8 pictures: one encoded key-frame group of a second, repeated (fast)."""
    group = vp8_pictures(VIDEO_FPS, VIDEO_SIZE, colour, fps=VIDEO_FPS, gop=VIDEO_FPS)
    assert group[0].keyframe
    return [group[n % len(group)] for n in range(count)]


def write_meeting(folder: Path, people: Sequence[Person], config: dict | None = None) -> Path:
    """Janus VideoRoom-named recordings of ``people`` (and a ``meeting.yaml`` from ``config``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for number, person in enumerate(people):
        first = T0_US + round(person.start * 1e6)
        audio = Stream.audio(_opus_payloads(person), 960, codec="opus", start_us=first,
                             ssrc=0x1000 + number)
        if person.levels:
            audio.extension(
                1,
                lambda p, who=person: audio_level_value(
                    LOUD_DBOV if who.speaks(who.start + p.index * 0.02) else QUIET_DBOV),
                uri=URI_AUDIO_LEVEL,
            )
        audio.write(folder / f"videoroom-{ROOM}-user-{person.uid}-{first}-audio-0.mjr")
        frames = round((person.end - person.start) * VIDEO_FPS)
        video = Stream.vp8(_pictures(person.colour, frames), start_us=first,
                           ssrc=0x2000 + number)
        video.write(folder / f"videoroom-{ROOM}-user-{person.uid}-{first + 91}-video-1.mjr")
    if config is not None:
        (folder / "meeting.yaml").write_text(yaml.safe_dump(config))
    return folder


# -- measuring ---------------------------------------------------------------------------------
def pictures_at(path: Path, times: Sequence[float]) -> dict[float, np.ndarray]:
    """RGB pictures of the output frames that show each of ``times`` (seconds)."""
    found: dict[float, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 30)
        wanted = {t: int(t * fps + 1e-6) for t in times}
        for frame in container.decode(stream):
            number = round(float(frame.pts * frame.time_base) * fps)
            for t, n in wanted.items():
                if n == number:
                    found[t] = frame.to_ndarray(format="rgb24")
            if len(found) == len(wanted):
                break
    missing = set(times) - set(found)
    assert not missing, f"no output frame at {sorted(missing)} s"
    return found


def colour_at(picture: np.ndarray, x: int, y: int) -> np.ndarray:
    return picture[y - 4 : y + 4, x - 4 : x + 4].reshape(-1, 3).mean(axis=0)


def near(colour: np.ndarray, expected: Sequence[int]) -> bool:
    return bool(np.abs(colour - np.asarray(expected, dtype=float)).max() < TOLERANCE)


def speaker_at(changes: Sequence[SpeakerChange], t: float) -> str | None:
    current = None
    for change in changes:
        if change.at_us > t * 1e6:
            break
        current = change.participant
    return current


def speaker_point(plan: Plan, t: float) -> tuple[int, int]:
    """Where to look in the speaker region at ``t``: its picture's centre column, 80 % down."""
    at = t * 1e6
    scene = next(s for s in plan.scenes if s.start_us <= at < s.end_us)
    placement = next(p for p in scene.placements if p.region == "speaker")
    box = placement.content
    return box.x + box.width // 2, box.y + box.height * 4 // 5


def small(name: str, width: int = 640, height: int = 360, fps: int = 30,
          **extra: object) -> Layout:
    """A built-in layout on a smaller canvas (fast renders), with extra top-level fields."""
    data = load_layout(name).model_dump(mode="json", by_alias=True, exclude_none=True)
    data["canvas"].update(width=width, height=height, fps=fps)
    data.update(extra)
    return parse_layout(data, f"{name} (small)")


@dataclass
class Rendered:
    meeting: Meeting
    result: RenderResult
    path: Path

    @property
    def plan(self) -> Plan:
        return self.result.plan


def render_one(meeting: Meeting, layout: Layout, path: Path) -> Rendered:
    result = render(plan_render(meeting, layout), [(path, PRESETS["mp4"])])
    return Rendered(meeting, result, path)


# -- (a) a screen share takes the presentation layout ----------------------------------------
SCREEN_PEOPLE = [
    Person("101", RED, 400, 0, 8),
    Person("102", GREEN, 600, 0, 8),
    Person("103", BLUE, 800, 2, 5),
]


@pytest.fixture(scope="module")
def screen_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("screen") / "meeting"
    config = {"participants": {"103": {"display": "Slides", "kind": "screen"}}}
    return write_meeting(folder, SCREEN_PEOPLE, config)


@pytest.fixture(scope="module")
def screen_render(screen_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    meeting = discover([screen_folder])
    out = tmp_path_factory.mktemp("screen-out") / "grid.mp4"
    return render_one(meeting, load_layout("grid"), out)


def test_screen_kind_comes_from_meeting_yaml_or_display_name(
    screen_folder: Path, tmp_path: Path
) -> None:
    meeting = discover([screen_folder])
    kinds = {p.id: (p.display, p.kind) for p in meeting.participants}
    assert kinds == {"101": ("101", "camera"), "102": ("102", "camera"),
                     "103": ("Slides", "screen")}
    # A display name containing "screen" is enough without `kind`.
    twin = tmp_path / "named"
    twin.mkdir()
    for path in screen_folder.glob("*.mjr"):
        shutil.copy(path, twin / path.name)
    (twin / "meeting.yaml").write_text(yaml.safe_dump(
        {"participants": {"103": {"display": "Dana's Screen"}}}))
    named = discover([twin])
    assert named.participant("103").kind == "screen"
    plan, _ = plan_meeting(named, load_layout("grid"))
    layouts = [(round(s.start_us / 1e6, 2), round(s.end_us / 1e6, 2), s.layout)
               for s in plan.scenes]
    assert layouts == [(0, 2, "grid"), (2, 5, "presentation"), (5, 8, "grid")], layouts


def test_screen_share_fills_the_big_left_region_only_while_present(
    screen_render: Rendered,
) -> None:
    width, height = 1280, 720
    left = int(width * 0.75)  # presentation: screen region 75 % wide, cameras to its right
    before_after = [0.5, 1.9, 5.1, 6.5, 7.9]
    during = [2.1, 3.5, 4.9]
    pictures = pictures_at(screen_render.path, before_after + during)
    red, green, blue = SCREEN_PEOPLE[0].colour, SCREEN_PEOPLE[1].colour, SCREEN_PEOPLE[2].colour
    for t in during:
        picture = pictures[t]
        for fx in (0.15, 0.5, 0.85):
            for fy in (0.25, 0.5, 0.8):
                colour = colour_at(picture, int(left * fx), int(height * fy))
                assert near(colour, blue), (t, fx, fy, colour)
        # The cameras, in join order, one above the other in the right-hand column.
        column = (left + width) // 2
        assert near(colour_at(picture, column, height // 2 * 4 // 5), red), t
        assert near(colour_at(picture, column, height // 2 + height // 2 * 4 // 5), green), t
        for fy in (0.1, 0.3, 0.6, 0.9):
            assert not near(colour_at(picture, column, int(height * fy)), blue), (t, fy)
    for t in before_after:
        picture = pictures[t]
        # The grid of two: left half and right half.
        for fy in (0.3, 0.5, 0.8):
            assert near(colour_at(picture, width // 4, int(height * fy)), red), (t, fy)
            assert near(colour_at(picture, width * 3 // 4, int(height * fy)), green), (t, fy)
        # The screen share's colour is nowhere.
        for fx in np.linspace(0.05, 0.95, 10):
            for fy in np.linspace(0.1, 0.9, 5):
                colour = colour_at(picture, int(width * fx), int(height * fy))
                assert not near(colour, blue), (t, fx, fy, colour)


# -- (b) a pin rule, and (d) speakers from RFC 6464 levels and from decoded audio ------------
#: Alice and Bob alternate 3 s turns; short interjections (0.3 s) while the other speaks must
#: not take the floor; Carol only ever interjects.
ALICE_TURNS = ((0.0, 3.0), (4.2, 4.5), (6.0, 9.0))
BOB_TURNS = ((1.2, 1.5), (3.0, 6.0), (7.3, 7.6), (9.0, 12.0))
CAROL_TURNS = ((10.0, 10.3),)
#: The true floor: (from, who).
FLOOR = [(0.0, "101"), (3.0, "102"), (6.0, "101"), (9.0, "102")]
INTERJECTIONS = [(1.2, 1.5), (4.2, 4.5), (7.3, 7.6), (10.0, 10.3)]
NAMES = {"participants": {"101": {"display": "Alice"}, "102": {"display": "Bob"},
                          "103": {"display": "Carol"}}}


def turn_people(levels: bool) -> list[Person]:
    return [
        Person("101", RED, 400, 0, 12, ALICE_TURNS, levels),
        Person("102", GREEN, 600, 0, 12, BOB_TURNS, levels),
        Person("103", BLUE, 800, 0, 12, CAROL_TURNS, levels),
    ]


COLOURS = {"101": RED, "102": GREEN, "103": BLUE}


@pytest.fixture(scope="module", params=[True, False], ids=["rfc6464", "decoded"])
def turn_meeting(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Meeting:
    name = "levels" if request.param else "decoded"
    folder = tmp_path_factory.mktemp(f"turns-{name}") / "meeting"
    return discover([write_meeting(folder, turn_people(request.param), NAMES)])


def test_speaker_timeline_follows_turns_and_ignores_interjections(turn_meeting: Meeting) -> None:
    extension = [p.segments[0].audio.audio_level_id for p in turn_meeting.participants]
    levelled = all(p.segments[0].audio.levels for p in turn_meeting.participants)
    if levelled:
        assert None not in extension
    else:
        assert extension == [None, None, None]
    _, changes = plan_meeting(turn_meeting, load_layout("speaker"))
    got = [(round(c.at_us / 1e6, 2), c.participant) for c in changes]
    assert [who for _, who in got] == [who for _, who in FLOOR], got
    for (at, _), (truth, _) in zip(got, FLOOR, strict=True):
        assert abs(at - truth) <= 0.5, (got, FLOOR)
    for a, b in INTERJECTIONS:
        assert not [c for c in got if a - 0.05 <= c[0] <= b + 0.6], (a, b, got)


PIN_RULES = [{"from": "00:00:02", "to": "00:00:04", "pin": "Car*"}]


@pytest.fixture(scope="module")
def pinned_render(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    folder = tmp_path_factory.mktemp("pin") / "meeting"
    meeting = discover([write_meeting(folder, turn_people(True), NAMES)])
    layout = small("speaker", rules=PIN_RULES)
    return render_one(meeting, layout, folder.parent / "pinned.mp4")


def test_pin_rule_puts_the_pinned_participant_in_the_speaker_region(
    pinned_render: Rendered,
) -> None:
    # Truth: Carol between 2 and 4 s; otherwise whoever holds the floor.
    expected = {1.0: "101", 1.35: "101", 1.9: "101", 2.1: "103", 3.0: "103", 3.5: "103",
                3.9: "103", 4.35: "102", 5.0: "102", 7.0: "101", 7.45: "101", 10.15: "102",
                11.5: "102"}
    pictures = pictures_at(pinned_render.path, list(expected))
    for t, who in expected.items():
        colour = colour_at(pictures[t], *speaker_point(pinned_render.plan, t))
        assert near(colour, COLOURS[who]), (t, who, colour)
    # While pinned, Carol is in the speaker region only (not in the strip too).
    for scene in pinned_render.plan.scenes:
        if 2e6 <= scene.start_us < 4e6:
            carol = [p.region for p in scene.placements if p.participant == "103"]
            assert carol == ["speaker"], (scene.start_us, carol)


@pytest.fixture(scope="module")
def decoded_render(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    folder = tmp_path_factory.mktemp("decoded") / "meeting"
    meeting = discover([write_meeting(folder, turn_people(False), NAMES)])
    return render_one(meeting, small("speaker"), folder.parent / "speaker.mp4")


def test_rendered_speaker_region_follows_decoded_audio(decoded_render: Rendered) -> None:
    # Mid-turn and mid-interjection instants: the floor holder is shown.
    expected = {1.0: "101", 1.35: "101", 4.35: "102", 5.0: "102", 7.0: "101", 7.45: "101",
                10.15: "102", 11.5: "102"}
    pictures = pictures_at(decoded_render.path, list(expected))
    for t, who in expected.items():
        colour = colour_at(pictures[t], *speaker_point(decoded_render.plan, t))
        assert near(colour, COLOURS[who]), (t, who, colour)


# -- (c) the real turn-taking meeting -----------------------------------------------------------
TURN_TAKING = FIXTURES / "dev-turn-taking-vp8"


@dataclass
class Turn:
    pid: str
    start: float  # meeting seconds
    end: float

    @property
    def mid(self) -> float:
        return (self.start + self.end) / 2


@dataclass
class TurnTruth:
    turns: list[Turn]
    colours: dict[str, tuple[int, int, int]]
    clock_t0: dict[str, float]  # meeting seconds of each participant's media clock zero

    @property
    def long_turns(self) -> list[Turn]:
        return [t for t in self.turns if t.end - t.start >= 3]

    def in_flash(self, pid: str, t: float) -> bool:
        phase = (t - self.clock_t0[pid]) % 5.0
        return phase < 0.2 or phase > 4.9


def turn_truth() -> TurnTruth:
    data = json.loads((TURN_TAKING / "manifest.json").read_text())
    origin_us = min(f["mjr_first_packet_us"] for f in data["files"])
    room_us = data["scenario_t0_epoch"] * 1e6

    def meeting_s(rel_s: float) -> float:
        return (room_us + rel_s * 1e6 - origin_us) / 1e6

    turns = [Turn(str(t["publisher_id"]), meeting_s(t["start_rel_s"]), meeting_s(t["end_rel_s"]))
             for t in data["speaking_turns"]]
    colours = {str(p["id"]): tuple(p["color_rgb"]) for p in data["participants"]}
    clocks = {str(p["id"]): (p["actual"]["media_clock_t0_epoch"] * 1e6 - origin_us) / 1e6
              for p in data["participants"]}
    return TurnTruth(turns, colours, clocks)


@pytest.fixture(scope="module")
def turn_taking() -> tuple[Meeting, Layout, TurnTruth]:
    return discover([TURN_TAKING]), small("speaker", fps=15), turn_truth()


def test_turn_taking_speaker_timeline_does_not_flap(
    turn_taking: tuple[Meeting, Layout, TurnTruth],
) -> None:
    meeting, layout, truth = turn_taking
    _, changes = plan_meeting(meeting, layout)
    got = [(round(c.at_us / 1e6, 2), c.participant) for c in changes]
    for turn in truth.long_turns:
        assert speaker_at(changes, turn.mid) == turn.pid, (turn, got)
        # The floor changes hands soon after the turn starts.
        assert any(who == turn.pid and turn.start - 0.3 <= at <= turn.start + 1.2
                   for at, who in got), (turn, got)
    blip = next(t for t in truth.turns if t.end - t.start < 1)
    assert blip.pid == "521"
    holder = next(t for t in truth.long_turns if t.start < blip.start < t.end)
    # K's 0.4 s blip in L's turn never takes the floor, not even afterwards (hold).
    for t in np.arange(holder.start + 1.0, holder.end, 0.05):
        assert speaker_at(changes, t) == holder.pid, (t, got)
    assert len(changes) <= len(truth.turns) + 1, got


@pytest.fixture(scope="module")
def turn_taking_render(turn_taking: tuple[Meeting, Layout, TurnTruth],
                       tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    meeting, layout, _ = turn_taking
    return render_one(meeting, layout, tmp_path_factory.mktemp("turns") / "speaker.mp4")


def test_turn_taking_rendered_big_region_shows_who_speaks(
    turn_taking_render: Rendered, turn_taking: tuple[Meeting, Layout, TurnTruth],
) -> None:
    _, _, truth = turn_taking
    blip = next(t for t in truth.turns if t.end - t.start < 1)
    holder = next(t for t in truth.long_turns if t.start < blip.start < t.end)
    checks: dict[float, str] = {}
    for turn in truth.long_turns:
        for t in (turn.mid - 1.0, turn.mid, turn.mid + 1.0):
            checks[round(t, 3)] = turn.pid
    for t in (blip.mid, blip.end + 0.3):
        checks[round(t, 3)] = holder.pid
    checks = {t: who for t, who in checks.items() if not truth.in_flash(who, t)}
    assert len(checks) >= 10
    pictures = pictures_at(turn_taking_render.path, list(checks))
    for t, who in checks.items():
        colour = colour_at(pictures[t], *speaker_point(turn_taking_render.plan, t))
        assert near(colour, truth.colours[who]), (t, who, colour)
