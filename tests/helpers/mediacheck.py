"""Measurements on rendered media: what a person would check by eye and ear, as numbers.

The recordings carry sync markers (see the fixtures' README): every 5 s of a participant's
media clock the picture turns white and the tone doubles for 100 ms. These helpers find those
instants in decoded output so tests can compare them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np


@dataclass
class DecodedAudio:
    samples: np.ndarray  # mono float32
    rate: int
    start: float  # seconds, pts of the first decoded sample

    @property
    def duration(self) -> float:
        return len(self.samples) / self.rate


def decode_audio(path: Path | str, rate: int = 48000) -> DecodedAudio:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        chunks = []
        start = None
        for frame in container.decode(stream):
            if start is None and frame.pts is not None and frame.time_base is not None:
                start = float(frame.pts * frame.time_base)
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return DecodedAudio(samples, rate, start or 0.0)


def video_frames_mean(
    path: Path | str, box: tuple[float, float, float, float] = (0.2, 0.2, 0.8, 0.7)
) -> list[tuple[float, np.ndarray]]:
    """``(time, mean RGB)`` of each decoded frame over a box given as fractions of the frame."""
    out = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            image = frame.to_ndarray(format="rgb24")
            h, w = image.shape[:2]
            x0, y0, x1, y1 = box
            region = image[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)]
            out.append((float(frame.pts * frame.time_base), region.reshape(-1, 3).mean(axis=0)))
    return out


def flash_onsets(frames: list[tuple[float, np.ndarray]], threshold: float = 200.0) -> list[float]:
    """Times of the first white frame of each flash."""
    onsets = []
    previous_white = False
    for time, mean in frames:
        white = bool((mean > threshold).all())
        if white and not previous_white:
            onsets.append(time)
        previous_white = white
    return onsets


def tone_doubling_onsets(
    audio: DecodedAudio, base_hz: float, min_level: float = 0.05, min_run: int = 20
) -> list[float]:
    """Times where the tone jumps from ``base_hz`` to twice that, from zero-crossing periods.

    Half periods of the base tone last 1/(2f); of the doubled tone 1/(4f). An onset is the
    first half period closer to the doubled tone's after a run of base-tone half periods.
    """
    x = audio.samples.astype(np.float64)
    rate = audio.rate
    signs = np.signbit(x)
    crossings = np.nonzero(signs[1:] != signs[:-1])[0]
    if len(crossings) < 3:
        return []
    # Interpolate each crossing for sub-sample precision.
    a = x[crossings]
    b = x[crossings + 1]
    frac = np.where(b != a, a / (a - b), 0.0)
    times = (crossings + frac) / rate
    halves = np.diff(times)
    base_half = 1 / (2 * base_hz)
    doubled_half = base_half / 2
    is_doubled = np.abs(halves - doubled_half) < np.abs(halves - base_half) * 0.8
    # A doubling must hold for a while (turn edges and fades give stray short half periods)
    # and be loud enough (near-silence between speaking turns is ignored).
    window = int(0.005 * rate)
    onsets = []
    run_base = 0
    index = 0
    count = len(is_doubled)
    while index < count:
        if is_doubled[index]:
            end = index
            while end < count and is_doubled[end]:
                end += 1
            if run_base >= 10 and end - index >= min_run:
                at = int(crossings[index])
                level = np.abs(x[max(0, at - window) : at + window]).max()
                if level >= min_level:
                    onsets.append(audio.start + float(times[index]))
            run_base = 0
            index = end
            continue
        if abs(halves[index] - base_half) < 0.25 * base_half:
            run_base += 1
        index += 1
    return onsets


def pair_offsets(video: list[float], audio: list[float], max_apart: float = 0.5) -> list[float]:
    """For each flash, the nearest tone onset minus the flash time (only pairs within reach)."""
    offsets = []
    for flash in video:
        if not audio:
            break
        nearest = min(audio, key=lambda t: abs(t - flash))
        if abs(nearest - flash) <= max_apart:
            offsets.append(nearest - flash)
    return offsets


def tone_envelope(
    audio: DecodedAudio, freq: float, window: float = 0.04, hop: float = 0.005,
    start: float | None = None, end: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Amplitude of one frequency over time (Hann-windowed DFT bin, centred windows).

    Returns ``(times, amplitude)`` where a full-scale sine at ``freq`` reads 1.0. Hann
    windows keep a neighbour 50 Hz away (another participant's tone) out of the reading.
    """
    rate = audio.rate
    size = int(window * rate)
    step = max(1, int(hop * rate))
    first = 0 if start is None else max(0, int((start - audio.start) * rate) - size // 2)
    last = len(audio.samples) if end is None else min(
        len(audio.samples), int((end - audio.start) * rate) + size // 2)
    x = audio.samples[first:last].astype(np.float64)
    if len(x) < size:
        return np.zeros(0), np.zeros(0)
    frames = np.lib.stride_tricks.sliding_window_view(x, size)[::step]
    taper = np.hanning(size)
    phase = np.exp(-2j * np.pi * freq * np.arange(size) / rate) * taper
    amplitude = 2 * np.abs(frames @ phase) / taper.sum()
    times = audio.start + (first + np.arange(len(frames)) * step + size / 2) / rate
    return times, amplitude


def rising_edges(times: np.ndarray, amplitude: np.ndarray, threshold: float,
                 min_gap: float = 1.0) -> list[float]:
    """Times where ``amplitude`` first crosses ``threshold`` upwards (interpolated)."""
    above = amplitude >= threshold
    edges = []
    for index in np.nonzero(above[1:] & ~above[:-1])[0]:
        a, b = amplitude[index], amplitude[index + 1]
        frac = (threshold - a) / (b - a) if b != a else 0.0
        when = float(times[index] + frac * (times[index + 1] - times[index]))
        if not edges or when - edges[-1] >= min_gap:
            edges.append(when)
    return edges


def top_level_boxes(path: Path | str) -> list[str]:
    """The types of an MP4 file's top-level boxes, in file order (``moov`` before ``mdat``:
    the file plays while it downloads)."""
    boxes: list[str] = []
    with open(path, "rb") as f:
        size = Path(path).stat().st_size
        at = 0
        while at + 8 <= size:
            f.seek(at)
            header = f.read(16)
            length = int.from_bytes(header[:4], "big")
            boxes.append(header[4:8].decode("latin-1"))
            if length == 1:
                length = int.from_bytes(header[8:16], "big")
            elif length == 0:
                break
            at += length
    return boxes
