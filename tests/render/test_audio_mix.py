"""A render read from its first frame mixes every participant's audio in one FFmpeg input.

MLT would otherwise give each segment's audio a track and a ``mix`` transition, paid for on
every output frame. The single input must sound like the tracks it replaces: each voice at
the same level in both channels, starting and stopping at the same instants, the mix as
long as the meeting.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import av
import numpy as np
import pytest

from melter.compose import plan_meeting, prepare_media
from melter.engine.mlt import DocumentOptions, build_document, run_melt
from melter.layout.model import load_layout
from melter.meeting import discover
from tests.helpers.mediacheck import DecodedAudio, rising_edges, tone_envelope
from tests.helpers.mjrwriter import T0_US, Stream

RATE = 48000
#: Who speaks: (user id, codec, tone Hz, joins at s, seconds of audio).
VOICES = [(11, "opus", 440.0, 0.0, 6.0), (12, "opus", 1000.0, 1.52, 2.5),
          (13, "opus", 700.0, 3.05, 1.5)]


def write_meeting(folder: Path) -> None:
    folder.mkdir()
    for user, codec, tone, joins, seconds in VOICES:
        start = T0_US + round(joins * 1e6)
        assert codec == "opus"
        stream = Stream.opus(seconds, tone, start_us=start)
        stream.write(folder / f"videoroom-77-user-{user}-{start}-audio-0.mjr")


def render_audio(document_xml: str, path: Path, frames: int) -> np.ndarray:
    """Render the document's audio (32-bit float PCM, stereo); returns (channels, samples)."""
    path.with_suffix(".mlt").write_text(document_xml)
    run_melt(path.with_suffix(".mlt"), ["-consumer", f"avformat:{path}", "acodec=pcm_f32le",
                                        "frequency=48000", "channels=2", "vn=1",
                                        "real_time=-1"], frames)
    with av.open(str(path)) as container:
        return np.concatenate([frame.to_ndarray().reshape(-1, 2).T
                               for frame in container.decode(audio=0)], axis=1)


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("mix")
    write_meeting(work / "meeting")
    meeting = discover([work / "meeting"])
    media = prepare_media(meeting, work / "media", 30)
    plan, _ = plan_meeting(meeting, load_layout("audio-only"))
    out = {}
    for mixed in (False, True):
        options = DocumentOptions(1280, 720, audio_only=True, mix_audio=mixed)
        document = build_document(plan, media, options)
        tree = ET.fromstring(document.xml)
        resources = [e.text or "" for e in tree.iter("property") if e.get("name") == "resource"]
        mixes = [r for r in resources if r.startswith("lavfi:")]
        # One producer mixes all three voices, or each voice has its own.
        assert (len(mixes), len(resources)) == ((1, 2) if mixed else (0, 4)), resources
        out[mixed] = render_audio(document.xml, work / f"mix-{mixed}.mkv", document.frames)
    return out, plan, media


def test_the_mix_lasts_the_meeting(renders) -> None:  # type: ignore[no-untyped-def]
    out, plan, _ = renders
    for audio in out.values():
        assert abs(audio.shape[1] / RATE - plan.duration_us / 1e6) < 1 / 30 + 0.001


def test_each_voice_starts_and_stops_where_the_tracks_did(renders) -> None:  # type: ignore[no-untyped-def]
    out, _, _ = renders
    for _, _, tone, joins, seconds in VOICES:
        edges = {}
        for mixed, audio in out.items():
            # Silence around the mix, so a voice heard from the first or to the last sample
            # has an onset and an end.
            silence = np.zeros(RATE // 10)
            padded = np.concatenate([silence, audio[0], silence]).astype(np.float32)
            decoded = DecodedAudio(padded, RATE, -0.1)
            times, amplitude = tone_envelope(decoded, tone, window=0.04, hop=0.0005)
            # Each voice is heard from where it joined, to within the Opus pre-skip.
            on = rising_edges(times, amplitude, 0.15)
            off = rising_edges(times[::-1], amplitude[::-1], 0.15, min_gap=-1e9)
            assert on and off, (tone, mixed)
            edges[mixed] = (on[0], off[0])
            assert abs(on[0] - joins) < 0.012, (tone, mixed, on[0])
            assert abs(off[0] - (joins + seconds)) < 0.025, (tone, mixed, off[0])
        # Both ways agree to a fraction of a frame.
        assert abs(edges[True][0] - edges[False][0]) < 0.010, (tone, edges)
        assert abs(edges[True][1] - edges[False][1]) < 0.010, (tone, edges)


def test_each_voice_keeps_its_level_in_both_channels(renders) -> None:  # type: ignore[no-untyped-def]
    out, _, _ = renders
    for _, codec, tone, joins, seconds in VOICES:
        levels = {}
        for mixed, audio in out.items():
            for channel in (0, 1):
                decoded = DecodedAudio(audio[channel].astype(np.float32), RATE, 0.0)
                _, amplitude = tone_envelope(decoded, tone, window=0.04, hop=0.01,
                                             start=joins + 0.2, end=joins + seconds - 0.2)
                levels[mixed, channel] = float(np.median(amplitude))
        # The writer's tones are 0.3 of full scale; G.711 and Opus keep that to a few percent.
        for key, level in levels.items():
            assert abs(level - 0.3) < 0.03, (codec, key, level)
        assert abs(levels[True, 0] - levels[False, 0]) < 0.01 * 0.3, (codec, levels)
        assert abs(levels[True, 1] - levels[True, 0]) < 0.001, (codec, levels)
