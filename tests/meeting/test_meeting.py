"""Meeting discovery and participant segments, checked on plans and rendered pixels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from melter.errors import MelterError
from melter.meeting import discover
from tests.helpers.mjrwriter import T0_US, Stream
from tests.layout.test_layout_rules import (
    ROOM,
    VIDEO_FPS,
    Person,
    _opus_payloads,
    _pictures,
    colour_at,
    near,
    pictures_at,
    render_one,
    small,
)

FIXTURES = Path(__file__).parent.parent / "fixtures"
RED = (200, 40, 40)
GREEN = (40, 180, 60)
CARD = (0x3A, 0x3A, 0x4A)  # the default placeholder colour


def write_files(folder: Path, person: Person, name: str | None = None, video: bool = True,
                room: str = ROOM, stamp_offset: int = 0) -> None:
    """One publishing session of ``person`` (VideoRoom names unless ``name`` is given)."""
    folder.mkdir(parents=True, exist_ok=True)
    first = T0_US + round(person.start * 1e6)
    stamp = first + stamp_offset
    audio = Stream.audio(_opus_payloads(person), 960, codec="opus", start_us=first)
    prefix = name or f"videoroom-{room}-user-{person.uid}-{stamp}"
    audio.write(folder / (f"{name}-audio.mjr" if name else f"{prefix}-audio-0.mjr"))
    if video:
        frames = round((person.end - person.start) * VIDEO_FPS)
        clip = Stream.vp8(_pictures(person.colour, frames), start_us=first)
        clip.write(folder / (f"{name}-video.mjr" if name else f"{prefix}-video-1.mjr"))


def cell_centre(plan, pid: str, t: float, height_fraction: float = 0.8):  # type: ignore[no-untyped-def]
    at = t * 1e6
    for scene in plan.scenes:
        if scene.start_us <= at < scene.end_us:
            for placement in scene.placements:
                if placement.participant == pid:
                    rect = placement.rect
                    return (rect.x + rect.width // 2,
                            rect.y + round(rect.height * height_fraction)), placement.video
    return None, None


@pytest.fixture(scope="module")
def rejoin_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("rejoin")
    write_files(folder, Person("301", RED, 440, 0, 3))
    write_files(folder, Person("301", RED, 440, 5, 8))  # leaves, then joins again
    write_files(folder, Person("302", GREEN, 660, 0, 8), video=False)  # audio only
    return folder


def test_rejoin_gives_two_segments_and_audio_only_a_card(rejoin_folder: Path) -> None:
    meeting = discover([rejoin_folder])
    by_id = {p.id: p for p in meeting.participants}
    assert sorted(by_id) == ["301", "302"]
    rejoiner, listener = by_id["301"], by_id["302"]
    spans = [(round((s.start_us - meeting.start_us) / 1e6, 1),
              round((s.end_us - meeting.start_us) / 1e6, 1)) for s in rejoiner.segments]
    assert spans == [(0.0, 3.0), (5.0, 8.0)]
    assert [s.video is None for s in listener.segments] == [True]


def test_rejoin_and_audio_only_render(rejoin_folder: Path, tmp_path: Path) -> None:
    meeting = discover([rejoin_folder])
    rendered = render_one(meeting, small("grid"), tmp_path / "rejoin.mp4")
    plan = rendered.plan
    times = [1.5, 4.0, 6.5]
    pictures = pictures_at(rendered.path, times)
    for t in times:
        picture = pictures[t]
        where, shows_video = cell_centre(plan, "301", t)
        if t == 4.0:
            assert where is None  # gone between the two sessions
            # ...and nobody's cell shows red.
            other, _ = cell_centre(plan, "302", t)
            assert other is not None and not near(colour_at(picture, *other), RED)
        else:
            assert where is not None and shows_video
            assert near(colour_at(picture, *where), RED), (t, colour_at(picture, *where))
        # The audio-only participant has a placeholder card the whole time (its initials are
        # in the middle, so look near the top of the cell).
        card, shows_video = cell_centre(plan, "302", t, height_fraction=0.15)
        assert card is not None and shows_video is False
        assert near(colour_at(picture, *card), CARD), (t, colour_at(picture, *card))
        # ...and its initials, in white, in the middle of the card.
        (x, y), _ = cell_centre(plan, "302", t, height_fraction=0.5)
        middle = picture[y - 12 : y + 12, x - 20 : x + 20].astype(int)
        assert int((middle.min(axis=2) > 200).sum()) > 20, t


def test_room_must_be_picked_when_a_folder_holds_several(tmp_path: Path) -> None:
    write_files(tmp_path, Person("401", RED, 440, 0, 2), room="7001")
    write_files(tmp_path, Person("402", GREEN, 660, 0, 2), room="7002")
    with pytest.raises(MelterError, match=r"2 rooms.*7001, 7002.*--room"):
        discover([tmp_path])
    meeting = discover([tmp_path], room="7002")
    assert meeting.room == "7002"
    assert [p.id for p in meeting.participants] == ["402"]
    result = subprocess.run(
        [sys.executable, "-m", "melter.cli", "plan", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "--room" in result.stderr


def test_record_and_play_names_group_by_id(tmp_path: Path) -> None:
    write_files(tmp_path, Person("a", RED, 440, 0, 2), name="rec-1234")
    write_files(tmp_path, Person("b", GREEN, 660, 0, 2), name="rec-5678")
    meeting = discover([tmp_path])
    assert sorted(p.id for p in meeting.participants) == ["1234", "5678"]
    assert all(len(p.segments) == 1 and p.segments[0].audio and p.segments[0].video
               for p in meeting.participants)


def test_display_names_come_from_the_janus_events_file() -> None:
    meeting = discover([FIXTURES / "dev-three-party-vp8"])
    assert {p.id: p.display for p in meeting.participants} == {
        "501": "X teal 350Hz", "502": "Y magenta 500Hz", "503": "Z yellow 750Hz"}
    assert meeting.room == "2001"


def test_meeting_yaml_names_and_kinds(tmp_path: Path) -> None:
    write_files(tmp_path, Person("601", RED, 440, 0, 2))
    (tmp_path / "meeting.yaml").write_text(
        'participants:\n  "601": {display: "Ada Lovelace", kind: screen}\n')
    participant = discover([tmp_path]).participants[0]
    assert (participant.display, participant.kind) == ("Ada Lovelace", "screen")
    (tmp_path / "meeting.yaml").write_text("participants:\n  x: {colour: red}\n")
    with pytest.raises(MelterError, match=r"meeting.yaml.*participants.x.colour"):
        discover([tmp_path])
