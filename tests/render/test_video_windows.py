"""A meeting's pictures rendered in windows are the whole render's pictures, frame for frame.

The farm renders a long meeting's video in chunks that start anywhere, so a window must show
each picture from the very output frame a single pass shows it from, even a picture whose time
lies a hair from the midpoint between two output frames. A window's first frame at 30 or 60 fps
rarely falls on a whole millisecond (frame 10258 is at 341933.3 ms), while the prepared files
count milliseconds: placing the pictures relative to the window's start rounded to the
millisecond moved every picture by up to a third of a millisecond, and a picture that close to
a midpoint then showed one frame early or late in that window only.
"""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import pytest

from melter.compose import prepare_media
from melter.layout.model import Layout, load_layout
from melter.render import PRESETS, RenderPlan, _document, plan_render, render
from tests.helpers.mjrwriter import T0_US, Stream, flash_pictures

END_MS = 9_000
CANVAS = (320, 180)
#: Window lengths (frames): starts fall on every remainder of a third of a millisecond.
WINDOW_FRAMES = 41


def _layout(fps: int) -> Layout:
    grid = load_layout("grid")
    width, height = CANVAS
    canvas = grid.canvas.model_copy(update={"fps": fps, "width": width, "height": height})
    return grid.model_copy(update={"canvas": canvas})


def _window_shift(fps: int) -> float:
    """How far (in output frames) rounding a window's start to the millisecond can move it."""
    return max(abs(n * 1000 / fps - round(n * 1000 / fps)) for n in range(fps)) * fps / 1000


def picture_times(fps: int) -> list[int]:
    """Milliseconds (the first picture at 0) that lie within a window's rounding of the
    midpoint between two output frames, on both sides of it, at least two frames apart."""
    shift = _window_shift(fps)
    assert shift > 0
    times = [0]
    for ms in range(1, END_MS):
        position = ms * fps / 1000
        if abs(position - math.floor(position) - 0.5) <= shift \
                and math.floor(position + 0.5) >= math.floor(times[-1] * fps / 1000 + 0.5) + 2:
            times.append(ms)
    return times


def _meeting(folder: Path, fps: int) -> list[int]:
    """One publisher whose pictures alternate between white and teal at ``picture_times``."""
    folder.mkdir(parents=True)
    times = picture_times(fps)
    white = frozenset(range(1, len(times), 2))
    pictures = flash_pictures("vp8", len(times), (20, 160, 160), white, size=(160, 90), gop=40)
    Stream.vp8(pictures, start_us=T0_US, ticks=[t * 90 for t in times], ssrc=0x4321).write(
        folder / f"videoroom-5-user-9-{T0_US}-video-1.mjr")
    return times


def _lumas(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.array([frame.to_ndarray(format="gray").mean()
                         for frame in container.decode(video=0)])


@pytest.mark.parametrize("fps", [30, 60])
def test_windows_show_each_picture_from_the_frame_the_whole_render_does(
        fps: int, tmp_path: Path) -> None:
    times = _meeting(tmp_path / "meeting", fps)
    planned: RenderPlan = plan_render(sorted((tmp_path / "meeting").glob("*.mjr")),
                                      _layout(fps))
    media = tmp_path / "media"
    render(planned, [(tmp_path / "whole.mp4", PRESETS["mp4"])], audio=False, workdir=media)
    whole = _lumas(tmp_path / "whole.mp4")
    assert len(whole) == planned.frames
    bright = whole > (whole.max() + whole.min()) / 2
    # The whole render shows picture k (white when k is odd) from the frame nearest its time.
    changes = [n for n in range(1, len(bright)) if bright[n] != bright[n - 1]]
    assert changes == [math.floor(t * fps / 1000 + 0.5) for t in times[1:]][:len(changes)]
    assert len(changes) >= len(times) - 2
    starts = list(range(WINDOW_FRAMES, planned.frames - WINDOW_FRAMES, WINDOW_FRAMES))
    assert {round(s * 1000 / fps) - s * 1000 / fps > 0 for s in starts} == {True, False}
    for first in starts:
        last = first + WINDOW_FRAMES - 1
        target = tmp_path / f"w{first}.mp4"
        render(planned, [(target, PRESETS["mp4"])], frames=(first, last), audio=False,
               workdir=media)
        got = _lumas(target)
        assert len(got) == WINDOW_FRAMES
        differing = [first + int(n) for n in np.nonzero(np.abs(got - whole[first:last + 1])
                                                          >= 3.0)[0]]
        assert not differing, (first, differing)


def test_a_chunks_document_holds_only_the_scenes_it_shows(tmp_path: Path) -> None:
    """melt visits every transition of its document on every frame: a chunk late in a long
    meeting must not carry the scenes before it, or each chunk would cost more than the last
    (a one-hour meeting's single pass slowed to under real time at 320x180 this way)."""
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "dev-turn-taking-vp8"
    planned = plan_render(sorted(fixture.glob("*.mjr")), load_layout("speaker"))
    media = prepare_media(planned.meeting, tmp_path / "media", planned.fps)
    fps = planned.fps
    scenes = planned.plan.scenes
    assert len(scenes) >= 8
    whole = _document(planned, media, PRESETS["mp4"], None, True).xml.count('">composite<')
    counts = []
    for first in range(0, planned.frames - 60, 60):
        last = first + 59
        overlapping = [scene for scene in scenes
                       if scene.start_us * fps < (last + 1) * 1_000_000
                       and scene.end_us * fps > first * 1_000_000]
        # One transition per placement and one for the names track, in each scene shown.
        shown = sum(len(scene.placements) + 1 for scene in overlapping)
        xml = _document(planned, media, PRESETS["mp4"], (first, last), True).xml
        counts.append(xml.count('">composite<'))
        assert counts[-1] <= shown, (first, counts[-1], shown)
    assert max(counts) < whole / 2, (counts, whole)
