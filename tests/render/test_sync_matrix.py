"""Lip sync at every frame rate, measured: generated meetings rendered at 25, 30, 50 and 60 fps.

Each participant sends a solid colour picture (VP8, or H.264 for some) and an Opus tone of its
own frequency. At chosen marker instants the picture taken at exactly that instant, and the
ones after it for 100 ms, are white, and the tone doubles its frequency for exactly 100 ms
from that same instant. Every picture's time is chosen here (its RTP timestamp, arriving on
the media clock), so the truth is known to the microsecond:

* a picture with meeting time ``t`` (meeting clock zero: the earliest first packet, where the
  output's frame 0 starts) first shows on output frame ``round(t * F)`` and stays until the
  next picture's frame — whatever the source's rate, constant or not;
* so in each tile sound and picture agree within half an output frame (plus a little);
* and tiles whose markers share an instant flash on the same output frame.

Sources: 5, 7.5, 10, 12, 15, 24, 25, 30 and 60 fps; one that changes rate mid-segment
(30 → 7.5 → 30); one with irregular spacing (±30 % on each interval, with dropped pictures);
late joiners whose pictures fall between output frames. Marker pictures never lie within
:data:`MARGIN` of the midpoint between two output frames, so "nearest" is unambiguous despite
the recordings' millisecond arrival times.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pytest

from melter.layout.model import Layout, load_layout
from melter.meeting import Meeting, discover
from melter.plan import Plan
from melter.render import PRESETS, STILL, RenderResult, plan_render, render
from tests.helpers.mediacheck import DecodedAudio, decode_audio, rising_edges, tone_envelope
from tests.helpers.mjrwriter import T0_US, Stream, flash_pictures, marker_tone, opus_signal_packets

OUTPUT_FPS = (25, 30, 50, 60)
TICKS = 90_000  # RTP video clock: all picture times are kept in these ticks
#: Marker pictures (and checked transitions) keep this far from any output frames' midpoint.
MARGIN = 0.0025
FLASH_S = 0.1
END_S = 6.0
CANVAS = (640, 360)
WHITE = 200  # every channel above this: a white (flash) picture
#: How far a tone doubling may be measured from its own time (AAC and the 80 ms windows).
AUDIO_TOLERANCE = 0.006

RED = (200, 40, 40)
GREEN = (40, 170, 60)
BLUE = (40, 70, 210)
ORANGE = (220, 140, 30)
#: Doubled tones (600..1020 Hz) lie 90 Hz or more from every other tone.
TONES = (300.0, 370.0, 440.0, 510.0)


def ms(value: float) -> int:
    """Meeting milliseconds in RTP ticks."""
    return round(value * 90)


def midpoint_distance(t: float, fps: int) -> float:
    """Seconds from ``t`` to the nearest midpoint between two output frames."""
    return abs((t * fps) % 1.0 - 0.5) / fps


def safe(t: float, rates: tuple[int, ...] = OUTPUT_FPS) -> bool:
    return all(midpoint_distance(t, fps) >= MARGIN for fps in rates)


@dataclass
class Source:
    """One participant: what was sent, when (meeting clock), and what should be seen."""

    user: str
    label: str  # the source's rate, as reported
    codec: str
    colour: tuple[int, int, int]
    tone: float
    join_ms: int  # first audio packet
    ticks: list[int]  # every picture's time, meeting clock
    markers: list[int] = field(default_factory=list)  # indices into ticks

    def time(self, index: int) -> float:
        return self.ticks[index] / TICKS

    def white(self, marker: int) -> list[int]:
        """The pictures of one flash: the marker's, and those less than 100 ms after it."""
        end = self.ticks[marker] + round(FLASH_S * TICKS)
        return [i for i in range(marker, len(self.ticks)) if self.ticks[i] < end]

    def after_flash(self, marker: int) -> int | None:
        """The first coloured picture after a flash."""
        last = self.white(marker)[-1]
        return last + 1 if last + 1 < len(self.ticks) else None


@dataclass
class Design:
    name: str
    common_ms: int  # the instant several participants' markers share
    sources: list[Source]


def grid(anchor: int, step: int, first: int, end: int) -> list[int]:
    """Picture times ``anchor + k * step`` within ``[first, end)``."""
    k0 = math.ceil((first - anchor) / step)
    k1 = math.ceil((end - anchor) / step)
    return [anchor + k * step for k in range(k0, k1)]


def pick(source: Source, near_s: float, avoid: set[int] | None = None) -> int:
    """The index of the picture nearest ``near_s`` that is safe to use as a marker."""
    candidates = [i for i in range(2, len(source.ticks) - 1)
                  if safe(source.time(i)) and abs(source.time(i) - near_s) < 0.35
                  and i not in (avoid or set())]
    assert candidates, (source.label, near_s)
    return min(candidates, key=lambda i: abs(source.time(i) - near_s))


def constant(user: str, fps: float, codec: str, colour: tuple[int, int, int], tone: float,
             join_ms: int, common_ms: int | None, anchor_ms: float | None = None,
             near: tuple[float, ...] = (1.3, 4.7)) -> Source:
    """A constant-rate source whose picture grid passes through the common marker instant
    (or through ``anchor_ms``), with markers near the times in ``near`` as well."""
    step = round(TICKS / fps)
    assert step * fps == TICKS
    anchor = ms(common_ms if anchor_ms is None else anchor_ms)  # type: ignore[arg-type]
    first = ms(join_ms + 20) if anchor_ms is None else anchor
    source = Source(user, f"{fps:g} fps", codec, colour, tone, join_ms,
                    grid(anchor, step, first, ms(END_S * 1000 - 50)))
    markers = [pick(source, t) for t in near if t > join_ms / 1000 + 0.4]
    if common_ms is not None:
        markers.append(source.ticks.index(ms(common_ms)))
    source.markers = sorted(markers)
    return source


def variable(user: str, colour: tuple[int, int, int], tone: float, join_ms: int,
             common_ms: int) -> Source:
    """30 fps until 2 s, 7.5 fps until 4 s (through the common instant), 30 fps again."""
    slow = grid(ms(common_ms), 12_000, ms(2000), ms(4000))
    before = grid(slow[0], 3000, ms(join_ms + 20), slow[0])
    after = grid(slow[-1], 3000, slow[-1] + 3000, ms(END_S * 1000 - 50))
    source = Source(user, "30>7.5>30 fps", "vp8", colour, tone, join_ms, before + slow + after)
    # One marker in each stretch, the second just after the change to 7.5 fps.
    source.markers = sorted([pick(source, 1.0), pick(source, 2.1),
                             source.ticks.index(ms(common_ms)), pick(source, 4.3)])
    return source


def irregular(user: str, colour: tuple[int, int, int], tone: float, join_ms: int,
              common_ms: int, seed: int = 7) -> Source:
    """About 15 fps, each interval 70..130 % of nominal (whole milliseconds), every fifth
    picture dropped by the sender, and the picture before each marker dropped too."""
    rng = random.Random(seed)
    nominal = 1000 / 15

    def steps(count: int) -> list[int]:
        return [ms(round(nominal * rng.uniform(0.7, 1.3))) for _ in range(count)]

    common = ms(common_ms)
    ticks = [common]
    for step in steps(60):
        if ticks[-1] + step >= ms(END_S * 1000 - 50):
            break
        ticks.append(ticks[-1] + step)
    for step in steps(60):
        if ticks[0] - step < ms(join_ms + 20):
            break
        ticks.insert(0, ticks[0] - step)
    source = Source(user, "~15 fps irregular", "vp8", colour, tone, join_ms, ticks)
    near = [pick(source, t) for t in (1.3, 4.7)]
    dropped = {i for i in range(3, len(ticks) - 1) if i % 5 == 0} | {i - 1 for i in near}
    keep_times = {ticks[i] for i in near} | {common}
    source.ticks = [t for i, t in enumerate(ticks) if i not in dropped or t in keep_times]
    source.markers = sorted(source.ticks.index(t) for t in keep_times)
    return source


def designs() -> list[Design]:
    # The common instants sit at different phases of the output frames (mod 200 ms:
    # 54, 96 and 136 ms).
    low = 3054
    mid = 3096
    high = 3136
    return [
        Design("low-rates", low, [
            constant("1", 5, "vp8", RED, TONES[0], 0, low),
            constant("2", 7.5, "vp8", GREEN, TONES[1], 137, low),
            constant("3", 10, "h264", BLUE, TONES[2], 251, low),
            # A late joiner, its pictures on a 12 fps grid between output frames.
            constant("4", 12, "vp8", ORANGE, TONES[3], 1473, low),
        ]),
        Design("mid-rates", mid, [
            constant("5", 15, "vp8", RED, TONES[0], 0, mid),
            constant("6", 24, "vp8", GREEN, TONES[1], 83, mid),
            constant("7", 25, "h264", BLUE, TONES[2], 171, mid),
            constant("8", 30, "vp8", ORANGE, TONES[3], 290, mid),
        ]),
        Design("odd-rates", high, [
            constant("9", 60, "vp8", RED, TONES[0], 0, high),
            variable("10", GREEN, TONES[1], 42, high),
            irregular("11", BLUE, TONES[2], 117, high),
            # A late joiner whose first picture comes 0.4 of a 30 fps frame after an output
            # frame (1800 ms + 13.3 ms), 15 fps from there.
            constant("12", 15, "h264", ORANGE, TONES[3], 1790, None, anchor_ms=1800 + 40 / 3,
                     near=(2.3, 3.5, 4.7)),
        ]),
    ]


def write_design(design: Design, folder: Path) -> None:
    folder.mkdir(parents=True)
    for source in design.sources:
        seconds = END_S - source.join_ms / 1000
        markers = [source.time(m) - source.join_ms / 1000 for m in source.markers]
        signal = marker_tone(seconds, source.tone, markers, amplitude=0.15, length=FLASH_S)
        audio_first = T0_US + source.join_ms * 1000
        Stream.audio(opus_signal_packets(signal), 960, codec="opus", start_us=audio_first,
                     ssrc=0x1000 + int(source.user)).write(
            folder / f"videoroom-77-user-{source.user}-{audio_first}-audio-0.mjr")
        white = frozenset(i for m in source.markers for i in source.white(m))
        pictures = flash_pictures(source.codec, len(source.ticks), source.colour, white)
        video_first = T0_US + round(source.ticks[0] * 1e6 / TICKS)
        relative = [t - source.ticks[0] for t in source.ticks]
        make = Stream.vp8 if source.codec == "vp8" else Stream.h264
        make(pictures, start_us=video_first, ticks=relative,
             ssrc=0x2000 + int(source.user)).write(
            folder / f"videoroom-77-user-{source.user}-{video_first}-video-1.mjr")


def layout_at(fps: int) -> Layout:
    grid_layout = load_layout("grid")
    width, height = CANVAS
    canvas = grid_layout.canvas.model_copy(update={"fps": fps, "width": width, "height": height})
    return grid_layout.model_copy(update={"canvas": canvas})


# -- measuring ---------------------------------------------------------------------------------
def cell_of(plan: Plan, participant: str, frame: int, fps: int) -> tuple[int, int] | None:
    """The centre of a participant's tile on output frame ``frame``."""
    at = (frame + 0.5) / fps * 1e6  # the frame's middle: scene bounds lie on frame starts
    for scene in plan.scenes:
        if scene.start_us <= at < scene.end_us:
            for placement in scene.placements:
                if placement.participant == participant:
                    rect = placement.rect
                    return rect.x + rect.width // 2, rect.y + rect.height // 2
    return None


def centre_colour(picture: np.ndarray, centre: tuple[int, int]) -> np.ndarray:
    x, y = centre
    return picture[y - 6 : y + 6, x - 6 : x + 6].reshape(-1, 3).mean(axis=0)


def is_white(colour: np.ndarray) -> bool:
    return bool((colour > WHITE).all())


@dataclass
class Rendered:
    design: Design
    fps: int
    meeting: Meeting
    result: RenderResult
    path: Path
    media: Path
    zero_s: float  # T0_US on the meeting clock (0 unless the writer's times moved)
    #: Per output frame, each participant's tile: W white, C its own colour, ? something
    #: else, - no tile.
    tiles: dict[str, str]
    audio: DecodedAudio

    def t(self, source: Source, index: int) -> float:
        """A picture's own time on the meeting clock."""
        return self.zero_s + source.time(index)

    def onsets(self, source: Source) -> list[int]:
        """Output frames where a white flash begins in this participant's tile."""
        series = self.tiles[source.user]
        return [n for n in range(1, len(series)) if series[n] == "W" != series[n - 1]]

    def flash_end(self, source: Source, onset: int) -> int | None:
        series = self.tiles[source.user]
        for n in range(onset, len(series)):
            if series[n] != "W":
                return n
        return None


def measure_tiles(path: Path, plan: Plan, sources: list[Source], fps: int) -> dict[str, str]:
    tiles: dict[str, list[str]] = {s.user: [] for s in sources}
    with av.open(str(path)) as container:
        for frame in container.decode(container.streams.video[0]):
            assert frame.pts is not None and frame.time_base is not None
            number = round(float(frame.pts * frame.time_base) * fps)
            picture = frame.to_ndarray(format="rgb24")
            for source in sources:
                series = tiles[source.user]
                assert number == len(series), (number, len(series))
                cell = cell_of(plan, source.user, number, fps)
                if cell is None:
                    series.append("-")
                    continue
                colour = centre_colour(picture, cell)
                own = np.abs(colour - source.colour).max() < 40
                series.append("W" if is_white(colour) else "C" if own else "?")
    return {user: "".join(series) for user, series in tiles.items()}


def doubling_onset(audio: DecodedAudio, tone: float, near_t: float) -> float:
    """When the tone doubles near ``near_t``: the half-height crossing of the doubled tone's
    amplitude in centred 80 ms Hann windows (which keep the 70 Hz neighbours out)."""
    times, amplitude = tone_envelope(audio, 2 * tone, window=0.08, hop=0.001,
                                     start=near_t - 0.4, end=near_t + 0.4)
    assert len(amplitude) and amplitude.max() > 0.05, (tone, near_t)
    edges = [d for d in rising_edges(times, amplitude, amplitude.max() / 2)
             if abs(d - near_t) < 0.3]
    assert edges, (tone, near_t)
    return edges[0]


@pytest.fixture(scope="module")
def meetings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Design, Meeting]]:
    out = {}
    for design in designs():
        folder = tmp_path_factory.mktemp(design.name) / "meeting"
        write_design(design, folder)
        out[design.name] = (design, discover([folder]))
    return out


CASES = [(d.name, fps) for d in designs() for fps in OUTPUT_FPS]


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{f}fps" for n, f in CASES])
def rendered(request: pytest.FixtureRequest, meetings: dict[str, tuple[Design, Meeting]],
             tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    name, fps = request.param
    design, meeting = meetings[name]
    work = tmp_path_factory.mktemp(f"{name}-{fps}")
    out = work / "grid.mp4"
    result = render(plan_render(meeting, layout_at(fps)), [(out, PRESETS["mp4"])],
                    workdir=work / "media")
    zero_s = (T0_US - meeting.start_us) / 1e6
    tiles = measure_tiles(out, result.plan, design.sources, fps)
    return Rendered(design, fps, meeting, result, out, work / "media", zero_s, tiles,
                    decode_audio(out))


# -- the design itself -------------------------------------------------------------------------
def test_the_design_covers_the_matrix_and_its_markers_are_unambiguous() -> None:
    all_designs = designs()
    labels = {s.label for d in all_designs for s in d.sources}
    for rate in ("5", "7.5", "10", "12", "15", "24", "25", "30", "60"):
        assert f"{rate} fps" in labels
    assert {"30>7.5>30 fps", "~15 fps irregular"} <= labels
    for design in all_designs:
        sharing = [s for s in design.sources if ms(design.common_ms) in
                   [s.ticks[m] for m in s.markers]]
        assert len(sharing) >= 3, design.name
        for source in design.sources:
            assert len(source.markers) >= 2, source.label
            for marker in source.markers:
                assert safe(source.time(marker)), (source.label, source.time(marker))
                assert source.time(marker) > source.time(0)
            gaps = np.diff([source.time(m) for m in source.markers])
            assert gaps.min() > 0.9, (source.label, gaps)  # one doubling per search window
    irregular_source = next(s for d in all_designs for s in d.sources if "irregular" in s.label)
    intervals = np.diff(irregular_source.ticks) / TICKS * 15
    assert intervals.min() < 0.8 and ((intervals > 1.2) & (intervals < 1.31)).any()
    assert (intervals > 1.35).sum() >= 8 and intervals.max() < 2.7  # dropped pictures


def test_recordings_carry_the_designed_picture_times(
    meetings: dict[str, tuple[Design, Meeting]],
) -> None:
    """The truth holds as written: every track starts where designed, meeting clock zero is
    the first participant's first audio packet, and the video tracks last as designed (the
    recordings store arrival times in whole milliseconds: within 1 ms)."""
    for design, meeting in meetings.values():
        assert meeting.start_us == T0_US
        for source in design.sources:
            segment = meeting.participant(source.user).segments[0]
            assert segment.audio is not None and segment.video is not None
            assert segment.audio.start_us == T0_US + source.join_ms * 1000
            assert abs(segment.video.start_us - (T0_US + source.ticks[0] / TICKS * 1e6)) <= 1000
            assert segment.video.frames == len(source.ticks)


# -- the matrix ----------------------------------------------------------------------------------
def test_each_flash_starts_on_the_output_frame_nearest_its_picture_time(
    rendered: Rendered,
) -> None:
    """The flash's first white frame is round(t * F) for the marker picture's own time t,
    and the first coloured picture after it takes over on round(t_next * F)."""
    fps = rendered.fps
    failures = []
    report = []
    for source in rendered.design.sources:
        seen = rendered.onsets(source)
        errors: list[int] = []  # flash onsets, frames late
        end_errors: list[int] = []  # the next coloured picture's first frame, frames late
        matched = set()
        for marker in source.markers:
            t = rendered.t(source, marker)
            expected = round(t * fps)
            found = [n for n in seen if abs(n - expected) <= 0.3 * fps]
            if len(found) != 1:
                failures.append(f"{source.label}: flash at {t:.4f} s seen on frames {found}")
                continue
            matched.add(found[0])
            errors.append(found[0] - expected)
            after = source.after_flash(marker)
            end = rendered.flash_end(source, found[0])
            if after is not None and end is not None and safe(rendered.t(source, after), (fps,)):
                end_errors.append(end - round(rendered.t(source, after) * fps))
        if any(errors):
            failures.append(f"{source.label}: flash onset errors (frames late) {errors}")
        if any(end_errors):
            failures.append(f"{source.label}: flash end errors (frames late) {end_errors}")
        extra = sorted(set(seen) - matched)
        if extra:
            failures.append(f"{source.label}: white on frames {extra} where no flash was sent "
                            f"(the output has {len(rendered.tiles[source.user])} frames)")
        odd = [n for n, state in enumerate(rendered.tiles[source.user]) if state == "?"]
        if odd:
            failures.append(f"{source.label}: the tile shows neither its colour nor white on "
                            f"frames {odd[:12]}")
        report.append(f"{source.label}: onsets {errors}, ends {end_errors}")
    print(f"\n[{rendered.design.name} @ {fps} fps] flash frame errors (frames late): "
          + "; ".join(report))
    assert not failures, "\n".join(failures)


def test_sound_and_picture_of_each_tile_agree_within_half_a_frame(rendered: Rendered) -> None:
    """Each flash's output time and its tone doubling's onset: |A/V| <= 0.5/F + 3 ms."""
    fps = rendered.fps
    limit = 0.5 / fps + 0.003
    failures = []
    lines = []
    for source in rendered.design.sources:
        seen = rendered.onsets(source)
        offsets = []
        audio_errors = []
        for marker in source.markers:
            t = rendered.t(source, marker)
            found = [n for n in seen if abs(n / fps - t) <= 0.3]
            assert found, (source.label, t)
            onset = doubling_onset(rendered.audio, source.tone, t)
            offsets.append(onset - found[0] / fps)
            audio_errors.append(onset - t)
        av_ms = np.abs(offsets) * 1000
        # The sound stays at its own time (lip sync is mended by moving pictures, not sound).
        if np.abs(audio_errors).max() > AUDIO_TOLERANCE:
            failures.append(f"{source.label}: tone doublings off their own times by "
                            f"{[round(e * 1000, 1) for e in audio_errors]} ms")
        lines.append(f"{source.label}: |A/V| median {np.median(av_ms):.1f} ms, worst "
                     f"{av_ms.max():.1f} ms (audio vs own time: worst "
                     f"{np.abs(audio_errors).max() * 1000:.1f} ms)")
        if av_ms.max() > limit * 1000:
            failures.append(f"{source.label}: A/V offsets (audio - video, ms) "
                            f"{[round(o * 1000, 1) for o in offsets]} beyond "
                            f"{limit * 1000:.1f}")
    print(f"\n[{rendered.design.name} @ {fps} fps]\n  " + "\n  ".join(lines))
    assert not failures, "\n".join(failures)


def test_tiles_flashing_at_one_instant_flash_together(rendered: Rendered) -> None:
    """Markers sharing an instant land within one output frame of each other."""
    fps = rendered.fps
    instant = rendered.zero_s + rendered.design.common_ms / 1000
    frames = {}
    for source in rendered.design.sources:
        if ms(rendered.design.common_ms) not in [source.ticks[m] for m in source.markers]:
            continue
        found = [n for n in rendered.onsets(source) if abs(n / fps - instant) <= 0.3]
        assert len(found) == 1, (source.label, found)
        frames[source.label] = found[0]
    assert len(frames) >= 3
    print(f"\n[{rendered.design.name} @ {fps} fps] common marker {instant:.3f} s "
          f"(nearest frame {round(instant * fps)}): {frames}")
    assert max(frames.values()) - min(frames.values()) <= 1, frames


# -- preview -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "fps"), [("low-rates", 25), ("odd-rates", 60)])
def test_preview_shows_each_flash_from_the_same_frame(
    name: str, fps: int, meetings: dict[str, tuple[Design, Meeting]], tmp_path: Path,
) -> None:
    """A preview (rendered from a seek, not from the start) at the common marker's frame
    shows the white tiles; one frame earlier, the colours."""
    design, meeting = meetings[name]
    layout = layout_at(fps)
    instant = (T0_US - meeting.start_us) / 1e6 + design.common_ms / 1000
    frame = round(instant * fps)
    sharing = [s for s in design.sources
               if ms(design.common_ms) in [s.ticks[m] for m in s.markers]]
    seen: dict[int, dict[str, str]] = {}
    for number in (frame - 1, frame):
        png = tmp_path / f"frame-{number}.png"
        planned = plan_render(meeting, layout)
        shown = planned.frame_at(number / fps)
        plan = render(planned, [(png, STILL)], frames=(shown, shown),
                      workdir=tmp_path / "media").plan
        with av.open(str(png)) as container:
            picture = next(container.decode(video=0)).to_ndarray(format="rgb24")
        seen[number] = {}
        for source in sharing:
            cell = cell_of(plan, source.user, number, fps)
            assert cell is not None, (source.label, number)
            colour = centre_colour(picture, cell)
            seen[number][source.label] = ("white" if is_white(colour) else
                                          "colour" if np.abs(colour - source.colour).max() < 40
                                          else f"other {colour.round()}")
    print(f"\n[preview {name} @ {fps} fps] frame {frame - 1}: {seen[frame - 1]}; "
          f"frame {frame}: {seen[frame]}")
    assert all(v == "colour" for v in seen[frame - 1].values()), seen
    assert all(v == "white" for v in seen[frame].values()), seen
