"""Rendered meetings, measured: tile colours, tones, sync markers and duration.

Truth comes from the fixtures' manifests (what each participant sent, and when Janus got its
first and last packet), never from Melter's own plan — except to know which cell to look at.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

from melter.layout.model import load_layout
from melter.meeting import Meeting, discover
from melter.plan import Plan
from melter.render import PRESETS, RenderResult, plan_render, render
from tests.helpers.mediacheck import DecodedAudio, decode_audio, rising_edges, tone_envelope

FIXTURES = Path(__file__).parent.parent / "fixtures"
MEETINGS = [
    "dev-three-party-vp8", "dev-two-party-h264", "dev-turn-taking-vp8",
    # Recorded by tests.helpers.record_janus_fixture: 10 fps, 30 fps and 6/12/25/30 fps publishers.
    "janus-10fps-vp8", "janus-30fps-h264", "janus-mixed-fps-vp8",
]
FPS = 30
FRAME = 1 / FPS
#: The sync Melter promises: each picture is shown from the output frame nearest its own time,
#: so it is at most half an output frame from its sound, plus what measuring the tone's onset
#: costs.
AV_LIMIT = FRAME / 2 + 0.003


@dataclass
class Person:
    name: str
    pid: str
    colour: np.ndarray
    tone: float
    join: float  # meeting seconds
    leave: float
    clock_t0: float  # meeting seconds of the participant's media clock zero
    pauses: list[tuple[float, float]]


@dataclass
class Rendered:
    meeting_name: str
    meeting: Meeting
    result: RenderResult
    path: Path
    people: list[Person]
    span: float
    audio: DecodedAudio

    @property
    def plan(self) -> Plan:
        return self.result.plan


def media_end_us(file: dict) -> float:
    """When a file's last packet was due: its first packet's arrival plus the RTP span (the
    sender's media clock). Not the last packet's arrival: a publisher that stalls sends its
    last packets late (janus-10fps-vp8 was recorded on a loaded machine; some of its packets
    arrived up to 0.9 s after their time)."""
    return file["mjr_first_packet_us"] + file["rtp"]["rtp_span_s"] * 1e6


def truth(meeting_name: str) -> tuple[list[Person], float]:
    """Participants' presence from the manifest (when Janus got the first packet, and how long
    the media clock ran from there)."""
    data = json.loads((FIXTURES / meeting_name / "manifest.json").read_text())
    files = data["files"]
    start_us = min(f["mjr_first_packet_us"] for f in files)
    end_us = max(media_end_us(f) for f in files)
    people = []
    for person in data["participants"]:
        mine = [f for f in files if f["participant"] == person["name"]]
        join = min(f["mjr_first_packet_us"] for f in mine)
        # The last audio packet plays for 20 ms.
        leave = max(media_end_us(f) for f in mine) + 20_000
        t0 = person["actual"]["media_clock_t0_epoch"] * 1e6
        pauses = [((t0 + a * 1e6 - start_us) / 1e6, (t0 + b * 1e6 - start_us) / 1e6)
                  for a, b in person.get("audio_gaps_s", [])]
        people.append(Person(
            person["name"], str(person["id"]), np.array(person["color_rgb"], dtype=float),
            float(person["tone_hz"]), (join - start_us) / 1e6, (leave - start_us) / 1e6,
            (t0 - start_us) / 1e6, pauses,
        ))
    return people, (end_us - start_us) / 1e6


_RENDERS: dict[tuple[str, str], Rendered] = {}


def rendering(name: str, layout: str, factory: pytest.TempPathFactory) -> Rendered:
    """``name`` rendered with ``layout`` (once per test session)."""
    if (name, layout) not in _RENDERS:
        meeting = discover([FIXTURES / name])
        out = factory.mktemp(name) / f"{layout}.mp4"
        result = render(plan_render(meeting, load_layout(layout)), [(out, PRESETS["mp4"])])
        people, span = truth(name)
        _RENDERS[name, layout] = Rendered(name, meeting, result, out, people, span,
                                          decode_audio(out))
    return _RENDERS[name, layout]


@pytest.fixture(scope="module", params=MEETINGS)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    return rendering(request.param, "grid", tmp_path_factory)


@pytest.fixture(scope="module", params=[(name, layout) for name in MEETINGS
                                        for layout in ("grid", "speaker")],
                ids=lambda param: "-".join(param))
def synced(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    name, layout = request.param
    return rendering(name, layout, tmp_path_factory)


def frames_at(path: Path, wanted: set[int]) -> dict[int, np.ndarray]:
    """RGB pictures of the given output frame numbers."""
    pictures: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            number = round(float(frame.pts * frame.time_base) * FPS)
            if number in wanted:
                pictures[number] = frame.to_ndarray(format="rgb24")
            if len(pictures) == len(wanted):
                break
    return pictures


def cell_of(plan: Plan, participant: str, t: float) -> tuple[int, int] | None:
    """Where to look for a participant in the output frame that starts at ``t``."""
    at = (t + FRAME / 2) * 1e6  # the frame's middle: scene bounds lie on frame starts
    for scene in plan.scenes:
        if scene.start_us <= at < scene.end_us:
            for placement in scene.placements:
                if placement.participant == participant:
                    # Below the picture's centred text, above its barcode.
                    rect = placement.rect
                    return rect.x + rect.width // 2, rect.y + rect.height * 4 // 5
    return None


def centre_colour(picture: np.ndarray, centre: tuple[int, int]) -> np.ndarray:
    x, y = centre
    return picture[y - 4 : y + 4, x - 4 : x + 4].reshape(-1, 3).mean(axis=0)


def in_flash(person: Person, t: float) -> bool:
    phase = (t - person.clock_t0) % 5.0
    return phase < 0.2 or phase > 4.9


def test_duration_is_the_meeting_span(rendered: Rendered) -> None:
    with av.open(str(rendered.path)) as container:
        video = container.streams.video[0]
        frames = sum(1 for _ in container.demux(video) if _.size)
    # Span: first packet to last packet (+ the last audio packet's 20 ms).
    expected = rendered.span + 0.020
    assert abs(frames / FPS - expected) <= 2 * FRAME, (frames, expected)
    assert abs(rendered.audio.duration - expected) <= 2 * FRAME


def test_tiles_show_each_participant_while_present(rendered: Rendered) -> None:
    plan = rendered.plan
    checks: list[tuple[int, Person, bool]] = []
    for person in rendered.people:
        # Well inside the presence, and one frame either side of joining and leaving.
        inside = [person.join + 0.5, (person.join + person.leave) / 2, person.leave - 0.5]
        for t in inside:
            frame = round(t * FPS)
            if not in_flash(person, frame / FPS):
                checks.append((frame, person, True))
        checks.append((math.ceil(person.join * FPS) + 1, person, True))
        if person.join > 2 * FRAME:
            checks.append((math.floor(person.join * FPS) - 1, person, False))
        if person.leave < rendered.span - 2 * FRAME:
            checks.append((math.ceil(person.leave * FPS) + 1, person, False))
        checks.append((math.floor(person.leave * FPS) - 1, person, True))
    pictures = frames_at(rendered.path, {frame for frame, _, _ in checks})
    for frame, person, present in checks:
        t = frame / FPS
        picture = pictures[frame]
        cell = cell_of(plan, person.pid, t)
        if present:
            assert cell is not None, f"{person.name} has no tile at {t:.3f} s"
            colour = centre_colour(picture, cell)
            if in_flash(person, t):
                continue
            assert np.abs(colour - person.colour).max() < 30, (person.name, t, colour)
        else:
            assert cell is None, f"{person.name} has a tile at {t:.3f} s, outside presence"
            # Nobody's tile shows this participant's colour.
            for other in rendered.people:
                where = cell_of(plan, other.pid, t)
                if where is not None:
                    colour = centre_colour(picture, where)
                    assert np.abs(colour - person.colour).max() > 30, (person.name, t)


def test_each_tone_is_audible_only_while_present(rendered: Rendered) -> None:
    audio = rendered.audio
    for person in rendered.people:
        times, amplitude = tone_envelope(audio, person.tone, window=0.08, hop=0.02)
        present = (times > person.join + 0.3) & (times < person.leave - 0.3)
        for a, b in person.pauses:
            present &= ~((times > a - 0.1) & (times < b + 0.1))
        absent = (times < person.join - 0.3) | (times > person.leave + 0.3)
        # Any tone starting or stopping abruptly splashes a click over every frequency.
        # So does every sync marker's frequency switch (every 5 s of each media clock).
        edges = [p.join for p in rendered.people] + [p.leave for p in rendered.people]
        for other in rendered.people:
            marks = np.arange(0, rendered.span + 5, 5.0) + other.clock_t0
            edges += list(marks) + list(marks + 0.1)
        for edge in edges:
            absent &= np.abs(times - edge) > 0.15
        absent &= times < audio.start + audio.duration - 0.15
        # In the turn-taking meeting a participant between turns sends the tone at -50 dBFS
        # (0.003): quiet but present; absence is true silence.
        assert np.median(amplitude[present]) > 0.002, person.name
        if absent.any():
            assert amplitude[absent].max() < 0.0005, (person.name, amplitude[absent].max())


def flashes_of(rendered: Rendered) -> dict[str, list[float]]:
    """Each participant's white sync flashes: output times of the frames they start on."""
    plan = rendered.plan
    brightness: dict[str, list[tuple[float, float]]] = {p.pid: [] for p in rendered.people}
    with av.open(str(rendered.path)) as container:
        for frame in container.decode(container.streams.video[0]):
            t = float(frame.pts * frame.time_base)
            picture = frame.to_ndarray(format="rgb24")
            for person in rendered.people:
                cell = cell_of(plan, person.pid, t)
                if cell is not None:
                    brightness[person.pid].append((t, float(centre_colour(picture, cell).min())))
    return {pid: [t for (t, b), (_, prev) in zip(samples[1:], samples, strict=False)
                  if b > 200 >= prev]
            for pid, samples in brightness.items()}


def doubling_onset(rendered: Rendered, person: Person, near_t: float) -> float | None:
    """When the person's tone doubles near ``near_t`` (None: no doubling there)."""
    if any(a - 0.2 < near_t < b + 0.2 for a, b in person.pauses):
        return None  # no audio then: the edge found would be the pause's click
    # 80 ms Hann windows keep a neighbour's tone 50 Hz away out; the centred window's
    # half-height crossing marks the onset.
    times, amplitude = tone_envelope(rendered.audio, 2 * person.tone, window=0.08,
                                     hop=0.001, start=near_t - 0.4, end=near_t + 0.4)
    if len(amplitude) == 0 or amplitude.max() < 0.05:
        return None  # no doubled tone: a marker outside a speaking turn
    edges = rising_edges(times, amplitude, amplitude.max() / 2)
    near = [d for d in edges if abs(d - near_t) < 0.3]
    assert near, (person.name, near_t)
    return near[0]


def test_each_participants_picture_and_sound_stay_within_half_a_frame(synced: Rendered) -> None:
    """Per participant, every white flash against its tone doubling, measured in the output:
    the picture is shown from the output frame nearest its time, so |video - audio| stays
    within half an output frame (plus the onset measurement's 3 ms), at every source rate."""
    flashes = flashes_of(synced)
    report, worst_all = [], 0.0
    for person in synced.people:
        offsets = []
        for flash in flashes[person.pid]:
            onset = doubling_onset(synced, person, flash)
            if onset is not None:
                offsets.append(flash - onset)  # > 0: the picture comes after its sound
        assert offsets, f"{person.name}: no flash paired with a tone doubling"
        worst = max(offsets, key=abs)
        worst_all = max(worst_all, abs(worst))
        report.append(f"{person.name} {len(offsets)} markers, median "
                      f"{1000 * float(np.median(np.abs(offsets))):.1f} ms, worst "
                      f"{1000 * worst:+.1f} ms")
    print(f"\n[{synced.meeting_name} {synced.path.stem}] |A/V| (limit "
          f"{1000 * AV_LIMIT:.1f} ms): " + "; ".join(report))
    assert worst_all <= AV_LIMIT, report


def test_flashes_and_tones_come_at_the_publishers_own_times(rendered: Rendered) -> None:
    """Each marker sits where the publisher's media clock put it (every 5 s from its zero):
    the flash on the output frame nearest that time, the tone's doubling within a few
    milliseconds of it. Relative sync alone would pass with both early or late."""
    files = json.loads((FIXTURES / rendered.meeting_name / "manifest.json").read_text())["files"]
    manifest_zero_us = min(f["mjr_first_packet_us"] for f in files)
    shift = (manifest_zero_us - rendered.meeting.start_us) / 1e6  # manifest to output time
    flashes = flashes_of(rendered)
    checked = 0
    for person in rendered.people:
        zero = person.clock_t0 + shift
        for flash in flashes[person.pid]:
            expected = zero + 5 * round((flash - zero) / 5)
            assert abs(flash - expected) <= FRAME / 2 + 0.003, (person.name, flash, expected)
            onset = doubling_onset(rendered, person, expected)
            if onset is not None:
                assert abs(onset - expected) <= 0.008, (person.name, onset, expected)
                checked += 1
    assert checked >= len(rendered.people)


def test_name_labels_sit_in_the_bottom_left_corner_of_each_tile(rendered: Rendered) -> None:
    """Each tile carries its participant's name: a dark box in the bottom-left corner (60 %
    black over the picture) with white letters in it, and the picture untouched above it."""
    plan = rendered.plan
    looks: list[tuple[int, Person]] = []
    for person in rendered.people:
        frame = round((person.join + person.leave) / 2 * FPS)
        while in_flash(person, frame / FPS):
            frame += 3
        looks.append((frame, person))
    pictures = frames_at(rendered.path, {frame for frame, _ in looks})
    for frame, person in looks:
        t = frame / FPS
        placement = next(p for s in plan.scenes if s.start_us <= (t + FRAME / 2) * 1e6 < s.end_us
                         for p in s.placements if p.participant == person.pid)
        assert placement.display
        rect = placement.rect
        picture = pictures[frame].astype(float)
        bottom = rect.y + rect.height - 4
        # The box's left padding: no letters, only the darkened picture.
        padding = picture[bottom - 26 : bottom - 8, rect.x + 6 : rect.x + 10]
        above = picture[bottom - 90 : bottom - 70, rect.x + 6 : rect.x + 10].reshape(-1, 3)
        assert np.abs(above.mean(axis=0) - person.colour).max() < 30, (person.name, t)
        assert padding.max() < 0.4 * 255 + 15, (person.name, t, padding.max())
        box = picture[bottom - 30 : bottom - 4, rect.x + 10 : rect.x + 10 + 60]
        letters = int((box.min(axis=2) > 200).sum())
        assert letters > 30, (person.name, t, letters)
