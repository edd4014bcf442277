"""Names drawn by FFmpeg inside each source's scaling graph, and the ones left to MLT.

A render whose sources reach MLT already scaled has FFmpeg's ``drawtext`` write the name into
the picture (no title track, no transition); names in other scripts, too long for their
cell, or with a ``?`` keep MLT's ``pango`` titles. A name reaches ``drawtext`` through two
levels of filter-graph escaping, so quotes, colons, commas, brackets and backslashes must
all come out on the picture.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import av
import numpy as np
import pytest

from melter.compose import plan_meeting, prepare_media
from melter.engine.mlt import DocumentOptions, build_document
from melter.layout.model import load_layout
from melter.meeting import discover
from melter.render import PRESETS, plan_render, render
from tests.layout.test_layout_rules import GREEN, RED, Person, write_meeting

BLUE = (40, 70, 200)
TRICKY = "O'Brien: A, B; [x] \\ y %{n}"
NAMES = {"31": TRICKY, "32": "王小明", "33": "Who?"}


@pytest.fixture(scope="module")
def meeting_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("labels") / "meeting"
    people = [Person("31", RED, 440, 0, 2), Person("32", GREEN, 600, 0, 2),
              Person("33", BLUE, 800, 0, 2)]
    config = {"participants": {uid: {"display": name} for uid, name in NAMES.items()}}
    return write_meeting(folder, people, config)


def _producers(xml: str) -> dict[str, str]:
    """Producer id -> resource or pango text."""
    found = {}
    for producer in ET.fromstring(xml).iter("producer"):
        props = {p.get("name"): p.text or "" for p in producer.iter("property")}
        found[producer.get("id") or ""] = props.get("text") or props.get("resource", "")
    return found


def test_which_names_ffmpeg_draws(meeting_dir: Path, tmp_path: Path) -> None:
    meeting = discover([meeting_dir])
    media = prepare_media(meeting, tmp_path / "media", 30)
    plan, _ = plan_meeting(meeting, load_layout("grid"))
    scaled, unscaled = DocumentOptions(1280, 720), DocumentOptions(1280, 720, prescale=False)
    drawn = _producers(build_document(plan, media, scaled).xml).values()
    lavfi = [r for r in drawn if r.startswith("lavfi:movie")]
    assert len(lavfi) == 3
    assert sum("drawtext" in r for r in lavfi) == 1
    assert sorted(r for r in drawn if not r.startswith(("lavfi", "#", "/"))) == [
        "Who?", "王小明"]
    # Without FFmpeg scaling (odd cell sizes) every name is a pango title.
    plain = _producers(build_document(plan, media, unscaled).xml).values()
    assert sorted(r for r in plain if not r.startswith(("lavfi", "#", "/"))) == sorted(
        NAMES.values())
    # A name too long for its cell at one em a character keeps pango, which shrinks it.
    long = {seg: m for seg, m in media.items()}
    many = plan_meeting(meeting, load_layout("grid"))[0]
    for scene in many.scenes:
        for index, placement in enumerate(scene.placements):
            scene.placements[index] = type(placement)(**{**placement.__dict__,
                                                         "display": "W" * 40})
    texts = _producers(build_document(many, long, scaled).xml).values()
    assert sum(t == "W" * 40 for t in texts) == 3


def test_drawn_names_show_every_character(meeting_dir: Path, tmp_path: Path) -> None:
    meeting = discover([meeting_dir])
    out = tmp_path / "labels.mp4"
    result = render(plan_render(meeting, load_layout("grid")), [(out, PRESETS["mp4"])])
    with av.open(str(out)) as container:
        picture = next(frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)
                       if float(frame.pts * frame.time_base) >= 1.0).astype(int)
    scene = next(s for s in result.plan.scenes if s.start_us <= 1.0e6 < s.end_us)
    widths = {}
    for placement in scene.placements:
        rect = placement.rect
        bottom = rect.y + rect.height - 4
        box = picture[bottom - 30 : bottom - 4, rect.x + 4 : rect.x + rect.width - 4]
        # The box: 60 % black over the picture, in from the cell's left edge.
        assert box[:, 2:6].max() < 0.4 * 255 + 15, (placement.display, box[:, 2:6].max())
        columns = np.nonzero((box.min(axis=2) > 200).any(axis=0))[0]
        assert len(columns) > 10, placement.display
        widths[placement.display] = int(columns.max() - columns.min())
    # All 27 characters of the tricky name: about 11 pixels each at 20 px (a name cut at its
    # first colon, comma or bracket would be "O'Brien" at most, under 80 pixels).
    assert widths[TRICKY] > 250, widths
