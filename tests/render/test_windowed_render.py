"""A meeting rendered window by window (``melter render`` of a long meeting) is the single
document's render: the same frames, the same pictures, the same samples in the same places.

Windows are what keeps a long meeting's render linear (each window's document holds only its
scenes), and they run side by side; here a real four-person Janus recording at 6, 12, 25 and
30 fps is cut into windows of a few seconds, so that every border falls mid-meeting, and the
result is measured against one melt run of the whole meeting and against its lossless mix.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from melter.layout.model import Layout, load_layout
from melter.render import PRESETS, RenderPlan, plan_render, render
from melter.windows import render_meeting, window_ranges
from tests.helpers.mediacheck import top_level_boxes

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "janus-mixed-fps-vp8"
WINDOW_S = 6.0


def _small(fps: int = 30) -> Layout:
    grid = load_layout("grid")
    canvas = grid.canvas.model_copy(update={"fps": fps, "width": 320, "height": 180})
    return grid.model_copy(update={"canvas": canvas})


@pytest.fixture(scope="module")
def planned() -> RenderPlan:
    return plan_render(sorted(FIXTURE.glob("*.mjr")), _small())


@pytest.fixture(scope="module")
def single(planned: RenderPlan, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One melt run per output over the whole meeting's document, and the mix itself."""
    folder = tmp_path_factory.mktemp("single")
    outputs = {name: folder / f"whole{PRESETS[name].suffix}" for name in ("mp4", "webm", "wav")}
    render(planned, [(path, PRESETS[name]) for name, path in outputs.items()],
           workdir=folder / "media")
    return outputs


def _lumas(path: Path) -> np.ndarray:
    """Each frame's mean luma in a 4 x 4 grid of tiles (a participant's picture shown a
    frame early or late moves its tiles by far more than the encoder's noise, 2 at most)."""
    with av.open(str(path)) as container:
        return np.array([frame.to_ndarray(format="gray").astype(float)
                         .reshape(4, frame.height // 4, 4, frame.width // 4).mean(axis=(1, 3))
                         .ravel() for frame in container.decode(video=0)])


def _key_frames(path: Path) -> list[int]:
    with av.open(str(path)) as container:
        packets = sorted((p for p in container.demux(video=0) if p.size),
                         key=lambda p: p.pts or 0)
        return [n for n, packet in enumerate(packets) if packet.is_keyframe]


def _sound(path: Path) -> np.ndarray:
    """Decoded samples as floats, shaped (channels, samples)."""
    with av.open(str(path)) as container:
        channels = container.streams.audio[0].codec_context.channels
        data = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    if data.dtype == np.int16:  # packed 16-bit PCM (WAV): one row of interleaved samples
        return data.reshape(-1, channels).T / 32768
    return data.reshape(channels, -1) if data.shape[0] == 1 and channels > 1 else data


def _error(heard: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """RMS difference with the mix in each AAC packet's length of samples."""
    count = min(heard.shape[1], mix.shape[1]) // 1024
    diff = heard[:, :count * 1024] - mix[:, :count * 1024]
    return np.sqrt(np.mean(diff.reshape(diff.shape[0], count, 1024) ** 2, axis=(0, 2)))


@pytest.mark.parametrize("name", ["mp4", "webm"])
def test_windows_join_into_the_single_documents_render(
        name: str, planned: RenderPlan, single: dict[str, Path], tmp_path: Path) -> None:
    preset = PRESETS[name]
    ranges = window_ranges(planned, preset, WINDOW_S)
    assert len(ranges) >= 3 and ranges[-1][1] == planned.frames - 1
    target = tmp_path / f"windows{preset.suffix}"
    result = render_meeting(planned, [(target, preset)], window_seconds=WINDOW_S, jobs=2,
                            workdir=tmp_path / "media")
    assert result.frames == planned.frames

    # Each window starts on a key frame of its own: the file was joined from them.
    keys = set(_key_frames(target))
    assert {first for first, _ in ranges} <= keys, (ranges, sorted(keys))

    if name == "mp4":  # as melt writes a single pass: playable while it downloads
        boxes = top_level_boxes(target)
        assert boxes.index("moov") < boxes.index("mdat"), boxes

    got, whole = _lumas(target), _lumas(single[name])
    assert len(got) == len(whole) == planned.frames
    assert float(np.abs(got - whole).max()) < 3.0

    heard, reference, mix = _sound(target), _sound(single[name]), _sound(single["wav"])
    # AAC pieces join packet for packet; Opus is encoded once at the join, by FFmpeg, and
    # pads its last frame (960 samples) otherwise than melt's encoder does.
    pad = 0 if preset.properties["acodec"] == "aac" else 960
    assert abs(heard.shape[1] - reference.shape[1]) <= pad, (heard.shape, reference.shape)
    assert heard.shape[1] >= mix.shape[1]
    # Aligned to the sample: moved by one either way, the difference with the mix grows.
    inner = slice(2048, mix.shape[1] - 2048)
    rms = float(np.sqrt(np.mean((heard[:, inner] - mix[:, inner]) ** 2)))
    for moved in (np.roll(heard, 1, axis=1), np.roll(heard, -1, axis=1)):
        assert float(np.sqrt(np.mean((moved[:, inner] - mix[:, inner]) ** 2))) > 2 * rms
    # As close to the mix as one encode of it, and nowhere a lost, repeated or clicking
    # packet (one such packet lies at the signal's own level from the mix, 0.01 and more).
    single_rms = float(np.sqrt(np.mean((reference[:, inner] - mix[:, inner]) ** 2)))
    signal = float(np.sqrt(np.mean(mix[:, inner] ** 2)))
    assert 20 * math.log10(signal / rms) >= 20 * math.log10(signal / single_rms) - 3.0
    worst = _error(heard[:, inner], mix[:, inner])
    assert float(worst.max()) < max(2 * float(_error(reference[:, inner], mix[:, inner]).max()),
                                    0.005), float(worst.max())


def test_a_windowed_hls_playlist_plays_whole(planned: RenderPlan, tmp_path: Path) -> None:
    preset = PRESETS["hls"]
    ranges = window_ranges(planned, preset, WINDOW_S)
    assert len(ranges) >= 3
    assert all(first % (6 * planned.fps) == 0 for first, _ in ranges)
    target = tmp_path / "meeting.m3u8"
    render_meeting(planned, [(target, preset)], window_seconds=WINDOW_S, jobs=2,
                   workdir=tmp_path / "media")
    durations = [float(line.split(":", 1)[1].rstrip(","))
                 for line in target.read_text().splitlines() if line.startswith("#EXTINF:")]
    assert math.isclose(sum(durations), planned.frames / planned.fps, abs_tol=0.05), durations
    assert all(d <= 6.0 + 1e-6 for d in durations)
    played = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(target),
                             "-f", "null", "-"], capture_output=True, text=True, check=False)
    assert played.returncode == 0 and not played.stderr.strip(), played.stderr[-500:]


def test_the_command_renders_a_long_meeting_in_windows(tmp_path: Path) -> None:
    """``melter render --window S --jobs N``: windows of S seconds, N at once."""
    layout = tmp_path / "small.yaml"
    layout.write_text(_small().model_dump_json())
    target = tmp_path / "meeting.mp4"
    done = subprocess.run([sys.executable, "-m", "melter.cli", "render", str(FIXTURE), "-o",
                           str(target), "--layout", str(layout), "--window", "8", "-j", "2"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-800:]
    planned = plan_render(sorted(FIXTURE.glob("*.mjr")), _small())
    ranges = window_ranges(planned, PRESETS["mp4"], 8.0)
    assert len(ranges) >= 2
    assert {first for first, _ in ranges} <= set(_key_frames(target))
    assert len(_lumas(target)) == planned.frames
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meeting.mp4", "small.yaml"]
