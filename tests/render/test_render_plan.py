"""A render plan is plain data: stored and read back it is the same plan, a stored plan of
another shape or version is refused, and a plan notices recordings that changed after it."""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from melter.compose import prepare_media
from melter.engine.mlt import build_document, trim_spans
from melter.layout.model import load_layout
from melter.render import RenderOptions, RenderPlan, StalePlan, plan_render
from tests.helpers.prefixes import arrivals, cut_at

FIXTURES = Path(__file__).parent.parent / "fixtures"


@pytest.mark.parametrize("fixture", ["dev-two-party-h264", "janus-mixed-fps-vp8"])
def test_a_stored_plan_reads_back_the_same(fixture: str) -> None:
    planned = plan_render([FIXTURES / fixture], load_layout("speaker"), RenderOptions(trim=True))
    data = planned.to_json()
    again = RenderPlan.from_json(data)
    assert again == planned
    assert again.to_json() == data
    assert again.frames == planned.frames == sum(b - a + 1 for a, b in trim_spans(planned.plan))
    assert again.layout == load_layout("speaker").model_dump(mode="json")


def test_a_plan_of_another_version_or_shape_is_stale() -> None:
    planned = plan_render([FIXTURES / "dev-two-party-h264"], load_layout("grid"))
    stored = json.loads(planned.to_json())
    for change in ({"format": 0}, {"melter": "0.0.0"}, {"shape": "0"}):
        with pytest.raises(StalePlan):
            RenderPlan.from_json(json.dumps({**stored, **change}))
    del stored["plan"]["meeting"]["participants"][0]["segments"][0]["index"]
    with pytest.raises(StalePlan):
        RenderPlan.from_json(json.dumps(stored))
    with pytest.raises(StalePlan):
        RenderPlan.from_json(b"not json")


def test_a_plan_notices_a_changed_recording(tmp_path: Path) -> None:
    folder = tmp_path / "meeting"
    shutil.copytree(FIXTURES / "dev-two-party-h264", folder)
    planned = plan_render([folder], load_layout("grid"))
    assert planned.unchanged()
    recording = planned.recording_paths[0]
    stat = recording.stat()
    os.utime(recording, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert not planned.unchanged()


def test_a_trimmed_document_plays_only_the_kept_spans(tmp_path: Path) -> None:
    planned = plan_render([FIXTURES / "dev-three-party-vp8"], load_layout("grid"),
                          RenderOptions(trim=True))
    media = prepare_media(planned.meeting, tmp_path / "media", planned.fps)
    document = build_document(planned.plan, media, planned.document_options())
    root = ET.fromstring(document.xml.split("\n", 1)[1])
    assert root.get("producer") == "trimmed"
    entries = [(int(e.get("in") or 0), int(e.get("out") or 0))
               for e in root.findall("playlist[@id='trimmed']/entry")]
    assert entries == trim_spans(planned.plan)
    assert document.frames == planned.frames


def test_a_plan_of_growing_recordings_holds_for_what_it_read(tmp_path: Path) -> None:
    """A plan made while Janus still writes holds for the bytes it analysed: the recordings
    growing on leave its prepared files as they were (named by what was read, not by the
    file's size now), and its units would render what it planned; a recording that shrank or
    went is a change."""
    source = FIXTURES / "janus-mixed-fps-vp8"
    live = tmp_path / "live"
    live.mkdir()
    recordings = sorted(source.glob("*.mjr"))
    at_us = min(arrivals(r).first_us for r in recordings) + 10_000_000
    for recording in recordings:
        assert cut_at(recording, at_us, live / recording.name, partial=7) is not None
    planned = plan_render([live], load_layout("grid"))
    media = prepare_media(planned.meeting, tmp_path / "media", planned.fps)
    made = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "media").iterdir()}
    assert planned.unchanged() and planned.only_grown()

    for recording in recordings:  # the meeting goes on: each file grows in place
        (live / recording.name).write_bytes(recording.read_bytes())
    assert not planned.unchanged() and planned.only_grown()
    again = prepare_media(planned.meeting, tmp_path / "media", planned.fps)
    assert again == media
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "media").iterdir()} == made

    grown = plan_render([live], load_layout("grid"))
    assert grown.frames > planned.frames + 5 * planned.fps
    later = prepare_media(grown.meeting, tmp_path / "media", grown.fps)
    assert {m.path for m in later.values()}.isdisjoint({m.path for m in media.values()})

    shrunk = live / recordings[0].name
    shrunk.write_bytes(shrunk.read_bytes()[:1000])
    assert not grown.only_grown()
    shrunk.unlink()
    assert not planned.only_grown()
