"""AAC encoded in pieces and joined by copying packets sounds like one encode.

A minute of sound (a steady tone, and a tone whose pitch glides, both continuous across every
border) is encoded in pieces of odd lengths, each from its PCM with context either side
(:func:`melter.splice.encode_stretch`), and muxed with a video (:func:`join_pieces`). Decoded,
it must hold the sound at the same samples as the PCM (a sample lost or repeated at a border
would shift everything after it), end where a single encode ends, and have no click at any
border: the error near a border is no larger than the encoder's error elsewhere.
"""

from __future__ import annotations

import subprocess
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from melter.errors import MelterError
from melter.splice import CONTEXT, FRAME, RUN_IN, Stretch, encode_stretch, join_pieces, on_grid

RATE = 48000
SECONDS = 60.0
#: Piece borders (samples), anywhere in a packet: on_grid moves each to the next packet border.
BORDERS = [470_011, 1_200_000, 1_633_337, 2_400_001]


def _signal() -> np.ndarray:
    t = np.arange(round(SECONDS * RATE)) / RATE
    steady = 0.3 * np.sin(2 * np.pi * 440 * t)
    glide = 0.2 * np.sin(2 * np.pi * (300 * t + 4 * t ** 2))  # 300 Hz up to 780 Hz
    left, right = steady + glide, steady - glide
    return np.round(np.stack([left, right], axis=1) * 32767).astype(np.int16)


def _wav(samples: np.ndarray, path: Path) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(samples.tobytes())
    return path


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)


def _video(path: Path) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"color=black:s=64x64:r=30:d={SECONDS}", "-c:v", "libx264", "-g", "30",
                    str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def joined(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("splice")
    samples = _signal()
    total = len(samples)
    starts = [0, *(on_grid(b) for b in BORDERS)]
    pieces, kept = [], []
    for number, start in enumerate(starts):
        end = starts[number + 1] if number + 1 < len(starts) else None
        low = max(0, start - RUN_IN - 777)  # the PCM starts off the grid, as a chunk's does
        high = total if end is None else min(total, end + CONTEXT + 5)
        pcm = _wav(samples[low:high], folder / f"p{number}.wav")
        piece = folder / f"p{number}.mka"
        kept.append(encode_stretch(pcm, low, Stretch(start, end), piece, bit_rate=128000))
        pieces.append(piece)
    target = folder / "joined.mp4"
    written = join_pieces(_video(folder / "video.mp4"), pieces, target, "mp4")
    whole = folder / "whole.m4a"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i",
                    str(_wav(samples, folder / "whole.wav")), "-c:a", "aac", "-b:a", "128k",
                    str(whole)], check=True)
    return {"samples": samples.T / 32768, "starts": starts, "kept": kept, "written": written,
            "joined": _decode(target), "whole": _decode(whole), "target": target}


def test_pieces_keep_whole_packets_of_their_stretch(joined: dict) -> None:
    starts, kept = joined["starts"], joined["kept"]
    # The first piece keeps its priming packet too; the last one its padding.
    assert kept[0] == starts[1] // FRAME + 1
    for number in range(1, len(starts) - 1):
        assert kept[number] == (starts[number + 1] - starts[number]) // FRAME
    assert kept[-1] >= -(-(round(SECONDS * RATE) - starts[-1]) // FRAME)
    assert joined["written"] == sum(kept)


def test_the_join_is_the_sound_at_the_same_samples_as_one_encode(joined: dict) -> None:
    truth, got, whole = joined["samples"], joined["joined"], joined["whole"]
    assert got.shape == whole.shape  # ends where one encode ends
    n = truth.shape[1]

    def rms(x: np.ndarray) -> float:
        return float(np.sqrt(np.mean(x ** 2)))

    error = rms(got[:, FRAME:n - FRAME] - truth[:, FRAME:n - FRAME])
    single = rms(whole[:, FRAME:n - FRAME] - truth[:, FRAME:n - FRAME])
    # Each piece's encoder ran in for 10 s: its noise is that of one encode.
    assert error < 1.5 * single + 1e-4, (error, single)
    for shift in (-1, 1):
        moved = rms(got[:, FRAME + shift:n - FRAME + shift] - truth[:, FRAME:n - FRAME])
        assert moved > 3 * error, (shift, moved, error)


def test_no_click_at_any_border(joined: dict) -> None:
    truth, got = joined["samples"], joined["joined"]
    n = truth.shape[1]
    error = np.abs(got[:, :n] - truth).max(axis=0)
    borders = joined["starts"][1:]
    away = np.ones(n, bool)
    for border in borders:
        away[border - 4 * FRAME:border + 4 * FRAME] = False
    away[:4 * FRAME] = away[-4 * FRAME:] = False
    usual = float(np.percentile(error[away], 99.99))
    for border in borders:
        near = float(error[border - 2 * FRAME:border + 2 * FRAME].max())
        assert near <= 1.5 * usual, (border, near, usual)


def test_a_piece_without_its_context_is_refused(tmp_path: Path) -> None:
    samples = _signal()[: 20 * RATE]
    pcm = _wav(samples[RATE:], tmp_path / "short.wav")
    with pytest.raises(MelterError, match="before the stretch"):
        encode_stretch(pcm, RATE, Stretch(on_grid(RATE + 1000), on_grid(10 * RATE)),
                       tmp_path / "x.mka", bit_rate=128000)
    pcm = _wav(samples[: 11 * RATE], tmp_path / "cut.wav")
    with pytest.raises(MelterError, match="ends too soon"):
        encode_stretch(pcm, 0, Stretch(on_grid(5 * RATE), on_grid(10 * RATE)),
                       tmp_path / "y.mka", bit_rate=128000)
