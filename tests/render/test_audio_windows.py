"""A meeting's audio rendered in windows, put end to end, is the whole render's audio.

The farm renders each chunk's audio as a unit of its own (PCM) and the join encodes the pieces
once, so the pieces must hold exactly the samples a single pass holds: no gap, no repeat, no
click at a border. Each window's mix reads its files from one second before its first sample
(decoders run in, then are cut at the sample a whole read reaches), never from their start.
"""

from __future__ import annotations

import re
from pathlib import Path

import av
import numpy as np
import pytest

from melter.compose import prepare_media
from melter.engine.mlt import AUDIO_PREROLL_S, build_document
from melter.layout.model import load_layout
from melter.render import PCM, RenderPlan, pcm_samples, plan_render, render
from tests.helpers.mjrwriter import Stream, opus_signal_packets, sine, vp8_pictures

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
#: Windows of odd lengths (frames), so borders fall anywhere in the audio packets.
WINDOW_FRAMES = 97


def _pcm(path: Path) -> np.ndarray:
    """Interleaved 16-bit samples as integers, shaped (samples, channels)."""
    with av.open(str(path)) as container:
        data = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    return data.astype(np.int32).reshape(-1, 2)


def _windows(planned: RenderPlan, size: int) -> list[tuple[int, int]]:
    return [(first, min(planned.frames - 1, first + size - 1))
            for first in range(0, planned.frames, size)]


def _whole_and_windows(planned: RenderPlan, tmp: Path, size: int,
                       ) -> tuple[np.ndarray, list[np.ndarray], list[tuple[int, int]]]:
    media = tmp / "media"
    render(planned, [(tmp / "whole.wav", PCM)], video=False, workdir=media)
    pieces = []
    windows = _windows(planned, size)
    for number, window in enumerate(windows):
        target = tmp / f"w{number}.wav"
        render(planned, [(target, PCM)], frames=window, video=False, workdir=media)
        pieces.append(_pcm(target))
    return _pcm(tmp / "whole.wav"), pieces, windows


@pytest.mark.parametrize("fixture", ["dev-turn-taking-vp8", "janus-10fps-vp8",
                                     "janus-30fps-h264"])
def test_windows_put_end_to_end_hold_the_whole_renders_samples(fixture: str,
                                                               tmp_path: Path) -> None:
    planned = plan_render(sorted((FIXTURES / fixture).glob("*.mjr")), load_layout("grid"))
    whole, pieces, windows = _whole_and_windows(planned, tmp_path, WINDOW_FRAMES)
    fps = planned.fps
    for piece, (first, last) in zip(pieces, windows, strict=True):
        assert len(piece) == pcm_samples(last + 1, fps) - pcm_samples(first, fps)
    joined = np.concatenate(pieces)
    assert joined.shape == whole.shape == (pcm_samples(planned.frames, fps), 2)
    difference = np.abs(joined - whole)
    # Opus decoders that sought and ran in for a second differ from one that decoded from the
    # start in a few rounding steps: one 16-bit step, in under 0.1 % of the samples.
    assert int(difference.max()) <= 1, int(difference.max())
    assert np.count_nonzero(difference) < 0.001 * difference.size, np.count_nonzero(difference)
    # Where the meeting is loud, the windows are not silent or shifted: a lag of one sample
    # would leave differences thousands of steps large.
    assert np.abs(whole).max() > 3000


def _tone_meeting(folder: Path, seconds: float) -> float:
    """One publisher sending a continuous 440 Hz tone (and pictures): the tone's amplitude."""
    folder.mkdir(parents=True)
    start = 1_700_000_000_000_000
    amplitude = 0.3
    tone = sine(seconds, 440.0, 48000, amplitude)
    Stream.audio(opus_signal_packets(tone), 960, codec="opus", start_us=start,
                 ssrc=0x1234).write(folder / f"videoroom-5-user-9-{start}-audio-0.mjr")
    pictures = vp8_pictures(round(seconds * 15), (160, 120), (40, 90, 200), fps=15, gop=30)
    Stream.vp8(pictures, start_us=start, fps=15, ssrc=0x4321).write(
        folder / f"videoroom-5-user-9-{start + 50}-video-1.mjr")
    return amplitude


def test_a_continuous_tone_has_no_click_at_any_window_border(tmp_path: Path) -> None:
    amplitude = _tone_meeting(tmp_path / "tone", 14.0)
    planned = plan_render(sorted((tmp_path / "tone").glob("*.mjr")), load_layout("grid"))
    whole, pieces, windows = _whole_and_windows(planned, tmp_path, 61)
    joined = np.concatenate(pieces)[:, 0] / 32768
    assert int(np.abs(np.concatenate(pieces) - whole).max()) <= 1
    fps = planned.fps
    borders = [pcm_samples(first, fps) for first, _ in windows[1:]]
    # A click is a jump: the tone's second difference is at most (2 pi f / rate)^2 times its
    # amplitude, plus the codec's noise; measured away from the borders, then at each border.
    steps = np.abs(np.diff(joined, 2))
    loud = slice(pcm_samples(fps, fps), pcm_samples(planned.frames - fps, fps))
    calm = float(steps[loud].max())
    assert calm < 8 * (2 * np.pi * 440 / 48000) ** 2 * amplitude + 0.01, calm
    inside = [b for b in borders if loud.start + 64 <= b <= loud.stop - 64]
    assert len(inside) >= 4
    for border in inside:
        near = float(steps[border - 64:border + 64].max())
        assert near <= calm, (border, near, calm)


def _sweep(seconds: float, amplitude: float = 0.3) -> np.ndarray:
    """A tone gliding from 200 Hz to 2 kHz: no stretch of it repeats, so audio placed a
    few samples off cannot match by chance."""
    t = np.arange(round(seconds * 48000)) / 48000
    return amplitude * np.sin(2 * np.pi * (200 * t + 900 * t * t / seconds))


def test_windows_hold_the_whole_renders_samples_across_odd_pauses(tmp_path: Path) -> None:
    """Audio whose RTP time jumps 5 ms after every second packet (a sender that pauses off the
    20 ms grid): the gaps are filled with silence packets, and a window's read, which seeks to
    whatever Ogg page holds its second of run-in, starts on such a packet in about a third of
    the windows. Shorter than Opus's pre-skip, it would leave that window's audio 5 ms early."""
    folder = tmp_path / "odd"
    folder.mkdir()
    start = 1_700_000_000_000_000
    seconds = 24.0
    payloads = opus_signal_packets(_sweep(seconds))
    ticks = [960 + (240 if n % 2 else 0) for n in range(len(payloads))]
    Stream.audio(payloads, ticks, codec="opus", start_us=start, ssrc=0x1234).write(
        folder / f"videoroom-5-user-9-{start}-audio-0.mjr")
    span = sum(ticks) / 48000
    pictures = vp8_pictures(round(span * 15), (160, 120), (40, 90, 200), fps=15, gop=30)
    Stream.vp8(pictures, start_us=start, fps=15, ssrc=0x4321).write(
        folder / f"videoroom-5-user-9-{start + 50}-video-1.mjr")
    planned = plan_render(sorted(folder.glob("*.mjr")), load_layout("grid"))
    whole, pieces, windows = _whole_and_windows(planned, tmp_path, 41)
    assert len(windows) >= 15
    fps = planned.fps
    for piece, (first, _) in zip(pieces, windows, strict=True):
        at = pcm_samples(first, fps)
        difference = int(np.abs(piece - whole[at:at + len(piece)]).max())
        assert difference <= 1, (first, difference)
    assert np.abs(whole).max() > 8000


def test_a_window_reads_its_files_from_a_second_before_it(tmp_path: Path) -> None:
    """No decoding from a file's start: each input of a later window's mix seeks."""
    planned = plan_render(sorted((FIXTURES / "dev-turn-taking-vp8").glob("*.mjr")),
                          load_layout("grid"))
    media = prepare_media(planned.meeting, tmp_path / "media", planned.fps)
    first, last = 600, 699
    document = build_document(planned.plan, media, planned.document_options(
        audio_only=True, window=(first, last)))
    seeks = [float(s) for s in re.findall(r"seek_point=([0-9.]+)", document.xml)]
    inputs = re.findall(r"amovie=", document.xml)
    assert len(seeks) == len(inputs) >= 2
    window_s = first / planned.fps
    for prepared, seek in zip(sorted(media.values(), key=lambda m: m.segment), seeks,
                              strict=False):
        start_s = prepared.start_frame / planned.fps
        assert seek == pytest.approx(window_s - start_s - AUDIO_PREROLL_S, abs=0.1)
