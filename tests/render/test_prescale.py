"""Sources scaled by FFmpeg before MLT sees them show the same pictures, at the same frames.

A render hands MLT each source already at its cell's size (an FFmpeg ``lavfi`` graph per
segment and size), or leaves the scaling to MLT (``prescale=False``, as for odd cell sizes).
Both documents are rendered here from the same prepared media and compared frame by frame:
a picture one frame early or late shows up at every sync flash, and a wrong size or fit at
the cell's edges.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import av
import numpy as np
import pytest

from melter.compose import plan_meeting, prepare_media
from melter.engine.mlt import DocumentOptions, Style, build_document, run_melt
from melter.layout.model import Layout, load_layout
from melter.meeting import discover
from melter.render import PRESETS, plan_render, render
from tests.helpers.mjrwriter import T0_US, Stream, vp8_pictures

FIXTURES = Path(__file__).parent.parent / "fixtures"
MEETING = FIXTURES / "dev-three-party-vp8"
#: The first 16 s: everyone has joined, and each picture has flashed at least twice.
FRAMES = 480


def strip_layout() -> Layout:
    """Letterboxed cells narrower than the 16:9 sources: bars above and below each picture."""
    return Layout.model_validate({
        "name": "strip",
        "canvas": {"width": 1280, "height": 720, "fps": 30, "background": "#000000"},
        "regions": [{"name": "strip", "x": 0, "y": 0, "width": 300, "height": 720,
                     "max_rows": 3, "max_columns": 1, "fit": "letterbox", "padding": 0}],
        "labels": {"enabled": False},
    })


def grid_layout() -> Layout:
    return load_layout("grid").model_copy(
        update={"labels": load_layout("grid").labels.model_copy(update={"enabled": False})})


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24").astype(np.int16)
                for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    meeting = discover([MEETING])
    return meeting, prepare_media(meeting, tmp_path_factory.mktemp("media"), 30)


@pytest.mark.parametrize("layout_factory", [grid_layout, strip_layout], ids=["crop", "letterbox"])
def test_prescaled_sources_show_the_same_pictures_at_the_same_frames(
    prepared, layout_factory, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    meeting, media = prepared
    layout = layout_factory()
    plan, _ = plan_meeting(meeting, layout)
    rendered: dict[bool, list[np.ndarray]] = {}
    for prescale in (False, True):
        options = DocumentOptions(1280, 720, Style(labels=False), prescale=prescale)
        document = build_document(plan, media, options)
        resources = [e.text or "" for e in ET.fromstring(document.xml).iter("property")
                     if e.get("name") == "resource"]
        lavfi = [r for r in resources if r.startswith("lavfi:")]
        scaling = [r for r in lavfi if "scale=" in r]
        # Every shown segment goes through FFmpeg's scaler when asked to, else none does.
        assert len(lavfi) >= 3
        assert len(scaling) >= 3 if prescale else not scaling
        path = tmp_path / f"prescale-{prescale}.mlt"
        path.write_text(document.xml)
        out = tmp_path / f"prescale-{prescale}.mp4"
        run_melt(path, ["-consumer", f"avformat:{out}", "real_time=-1", "vcodec=libx264",
                        "preset=ultrafast", "crf=12", "an=1"], FRAMES, extra=[f"out={FRAMES - 1}"])
        rendered[prescale] = decode(out)
    plain, scaled = rendered[False], rendered[True]
    assert len(plain) == len(scaled) == FRAMES
    # Per frame, the mean difference over the canvas: scaler rounding gives about one level;
    # a picture one frame off gives tens of levels on the frames around each white flash.
    differences = np.array([np.abs(a - b).mean() for a, b in zip(plain, scaled, strict=True)])
    flashes = np.array([a.mean() for a in plain])
    assert differences.max() < 3.0, (int(differences.argmax()), float(differences.max()))
    # The comparison can fail: the recordings flash, so a shifted copy differs.
    shifted = np.array([np.abs(a - b).mean() for a, b in zip(plain[1:], plain[:-1],
                                                               strict=True)])
    assert shifted.max() > 10 * differences.max()
    assert flashes.max() - np.median(flashes) > 20
    if layout.regions[0].fit == "letterbox":
        # Bars: above and below the picture the cell stays background.
        media_of = {m.segment.split("#")[0]: m for m in media.values() if m.has_video}
        scene = max(plan.scenes[:-1], key=lambda s: max(p.rect.height for p in s.placements))
        placement = next(p for p in scene.placements if p.rect.y == 0 and p.video)
        cell, source = placement.rect, media_of[placement.participant]
        bar = (cell.height - cell.width * source.height / source.width) / 2
        assert bar > 40  # the layout was made for this
        picture = scaled[round((scene.start_us + scene.end_us) / 2e6 * 30)]
        x = cell.x + cell.width // 2
        in_bar = picture[cell.y + round(bar / 2), x]
        middle = picture[cell.y + cell.height // 2, x]
        assert in_bar.max() < 20 and middle.max() > 60, (in_bar, middle)


@pytest.mark.parametrize(("degrees", "flip", "red_side"), [
    (90, False, "top"), (180, False, "right"), (270, False, "bottom"), (0, True, "right"),
    (90, True, "top"),
])
def test_rotated_video_is_rendered_upright(tmp_path: Path, degrees: int, flip: bool,
                                           red_side: str) -> None:
    """A segment with a display rotation is turned upright before it is scaled: clockwise by
    the orientation's degrees, then mirrored if it says so, as FFmpeg shows a file
    ``melter convert`` wrote (90 with a flip keeps red on top; a flip before the turn would
    put it at the bottom)."""
    folder = tmp_path / "meeting"
    folder.mkdir()
    pictures = vp8_pictures(45, split=True)  # left half red, right half blue
    start = T0_US
    Stream.vp8(pictures, start_us=start).orientation(3, degrees, flip=flip).write(
        folder / f"videoroom-4321-user-7-{start}-video-1.mjr")
    meeting = discover([folder])
    out = tmp_path / "rotated.mp4"
    result = render(plan_render(meeting, grid_layout()), [(out, PRESETS["mp4"])])
    picture = decode(out)[45]
    cell = result.plan.scenes[0].placements[0].rect
    x, y = cell.x + cell.width // 2, cell.y + cell.height // 2
    dx, dy = cell.width // 4, cell.height // 4
    sides = {"top": picture[y - dy, x], "bottom": picture[y + dy, x],
             "left": picture[y, x - dx], "right": picture[y, x + dx]}
    opposite = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}
    red, blue = sides[red_side], sides[opposite[red_side]]
    assert red[0] > 150 and red[2] < 90, red
    assert blue[2] > 150 and blue[0] < 90, blue
