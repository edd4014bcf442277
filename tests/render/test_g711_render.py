"""Meetings with G.711 publishers (SIP gateways, VideoRoom ``audiocodec=pcmu``) render.

Matroska cannot carry G.711 as sent, so the prepared media holds such audio decoded, in a
WAV file of its own; the render must still hear each voice only while its publisher is in
the meeting, and show their pictures.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from melter.compose import plan_meeting, prepare_media
from melter.engine.mlt import DocumentOptions, build_document
from melter.layout.model import load_layout
from melter.meeting import discover
from melter.render import PRESETS, plan_render, render
from tests.helpers.mediacheck import DecodedAudio, decode_audio, rising_edges, tone_envelope
from tests.helpers.mjrwriter import T0_US, Stream, g711_payloads, vp8_pictures

FRAME = 1 / 30
GREEN = (40, 160, 60)
RED = (200, 40, 40)
#: (user, audio codec, tone Hz, joins at s, leaves at s, picture colour or None: audio only)
PEOPLE = [
    ("21", "opus", 440.0, 0.0, 4.0, RED),
    ("22", "pcmu", 1000.0, 1.5, 4.0, GREEN),
    ("23", "pcma", 700.0, 2.0, 3.5, None),
]


def write_meeting(folder: Path) -> None:
    folder.mkdir()
    for user, codec, tone, joins, leaves, colour in PEOPLE:
        first = T0_US + round(joins * 1e6)
        seconds = leaves - joins
        if codec == "opus":
            audio = Stream.opus(seconds, tone, start_us=first)
        else:
            law = {"pcmu": "mulaw", "pcma": "alaw"}[codec]
            audio = Stream.audio(g711_payloads(seconds, tone, law=law), 160, codec=codec,
                                 pt={"pcmu": 0, "pcma": 8}[codec], start_us=first)
        audio.write(folder / f"videoroom-99-user-{user}-{first}-audio-0.mjr")
        if colour is not None:
            pictures = vp8_pictures(round(seconds * 15), (320, 240), colour, fps=15, gop=15)
            Stream.vp8(pictures, start_us=first + 91, ssrc=0x2000 + int(user)).write(
                folder / f"videoroom-99-user-{user}-{first + 91}-video-1.mjr")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("g711")
    write_meeting(work / "meeting")
    meeting = discover([work / "meeting"])
    out = work / "meeting.mp4"
    result = render(plan_render(meeting, load_layout("grid")), [(out, PRESETS["mp4"])],
                    workdir=work / "media")
    return meeting, result, out, work / "media"


def test_g711_audio_is_prepared_decoded_beside_the_video(rendered) -> None:  # type: ignore[no-untyped-def]
    meeting, _, _, media_dir = rendered
    media = prepare_media(meeting, media_dir, 30)
    by_user = {segment.split("#")[0]: prepared for segment, prepared in media.items()}
    # Opus goes into an Ogg file of its own (its timestamps count samples), beside the video.
    assert by_user["21"].path.suffix == ".mkv" and by_user["21"].audio_file.suffix == ".opus"
    assert by_user["22"].path.suffix == ".mkv" and by_user["22"].audio_file.suffix == ".wav"
    assert by_user["23"].audio_file.suffix == ".wav" and not by_user["23"].has_video
    with av.open(str(by_user["22"].audio_file)) as container:
        stream = container.streams.audio[0]
        assert (stream.codec_context.name, stream.sample_rate) == ("pcm_s16le", 8000)


def test_each_g711_voice_is_heard_only_while_present(rendered) -> None:  # type: ignore[no-untyped-def]
    _, _, out, _ = rendered
    audio = decode_audio(out)
    assert abs(audio.duration - 4.0) <= 2 * FRAME, audio.duration
    for _, _, tone, joins, leaves, _ in PEOPLE:
        times, amplitude = tone_envelope(audio, tone, window=0.04, hop=0.002)
        inside = (times > joins + 0.2) & (times < leaves - 0.2)
        # (From 0.3 s: the first voice's onset at 0 spreads over every tone's window.)
        before = (times > 0.3) & (times < joins - 0.2)
        assert np.median(amplitude[inside]) > 0.2, tone  # written at 0.3 of full scale
        if before.any():
            assert amplitude[before].max() < 0.03, tone  # a tenth of the voice: onset clicks
            onset = rising_edges(times, amplitude, 0.15)[0]
            # Within a frame of the join (MLT starts a segment at its first video key frame).
            assert abs(onset - joins) <= FRAME + 0.005, (tone, onset)


def test_the_g711_publisher_shows_its_picture(rendered) -> None:  # type: ignore[no-untyped-def]
    meeting, result, out, _ = rendered
    plan = result.plan
    with av.open(str(out)) as container:
        picture = next(frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)
                       if abs(float(frame.pts * frame.time_base) - 3.0) < FRAME / 2)
    scene = next(s for s in plan.scenes if s.start_us <= 3.0e6 < s.end_us)
    cell = next(p.rect for p in scene.placements if p.participant == "22")
    colour = picture[cell.y + cell.height // 2, cell.x + cell.width // 2].astype(int)
    assert np.abs(colour - GREEN).max() < 30, colour
    assert plan_meeting(meeting, load_layout("grid"))[0].duration_us == plan.duration_us


def test_mono_voices_join_the_mix_at_full_level_in_both_channels(rendered) -> None:  # type: ignore[no-untyped-def]
    meeting, result, out, media_dir = rendered
    media = prepare_media(meeting, media_dir, 30)
    document = build_document(result.plan, media,
                              DocumentOptions(1280, 720, prescale=True, mix_audio=True))
    # One input mixes all three voices; the two G.711 ones are mono, copied to both channels.
    assert document.xml.count("amovie=") == 3 and document.xml.count("pan=stereo") == 2
    with av.open(str(out)) as container:
        stereo = np.concatenate([frame.to_ndarray() for frame in container.decode(audio=0)],
                                axis=1)
    assert stereo.shape[0] == 2
    for _, codec, tone, joins, leaves, _ in PEOPLE:
        levels = []
        for channel in stereo:
            decoded = DecodedAudio(channel.astype(np.float32), 48000, 0.0)
            _, amplitude = tone_envelope(decoded, tone, window=0.04, hop=0.01,
                                         start=joins + 0.2, end=leaves - 0.2)
            levels.append(float(np.median(amplitude)))
        # Written at 0.3 of full scale: FFmpeg's own upmix would give 0.21 (3 dB less).
        assert all(abs(level - 0.3) < 0.015 for level in levels), (codec, levels)
        assert abs(levels[0] - levels[1]) < 0.002, (codec, levels)
