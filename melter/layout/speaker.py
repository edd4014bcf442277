"""Who is speaking: a speaker timeline from the recorded audio.

Levels come from the RFC 6464 audio-level header extension when the packets carry it (no
decoding needed), else from the decoded audio's RMS. Each participant's level is measured per
window; speech starts above ``on_dbov`` and ends below ``off_dbov`` (hysteresis). The floor
changes hands only when the current speaker has been quiet for ``hold`` seconds while someone
else speaks, or when a challenger is ``hysteresis_db`` louder; never twice within
``min_switch`` seconds. A short interjection while someone speaks therefore never takes the
floor.

Every decision is made going forward: the one at a window's start hears that window and the
ones before it, never later audio, and the meeting's length only says how many windows there
are. So a meeting still being recorded gets, up to one window before its end, the changes the
finished meeting will get (the rendering layer's plan horizon allows for that window).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import av
import numpy as np
from av.audio.codeccontext import AudioCodecContext

from melter.layout.model import Speaker
from melter.plan import SpeakerChange
from melter.track import TrackAnalysis, timed_frames

SILENCE_DBOV = -127.0


@dataclass
class LevelTrack:
    """A participant's audio level per window from ``start_us`` (dBov; -127 = silence)."""

    participant: str
    start_us: int
    window_us: int
    levels: np.ndarray


def levels_from_extension(analysis: TrackAnalysis, origin_us: int, window_us: int) -> np.ndarray:
    """Per-window loudest level from the packets' RFC 6464 values (no decoding)."""
    span = max(1, math.ceil((analysis.end_us - origin_us) / window_us))
    levels = np.full(span, SILENCE_DBOV)
    for frame in timed_frames(analysis):
        if frame.level is None:
            continue
        index = (frame.wall_us - origin_us) // window_us
        if 0 <= index < span:
            levels[index] = max(levels[index], -float(frame.level))
    return levels


def levels_from_audio(analysis: TrackAnalysis, origin_us: int, window_us: int) -> np.ndarray:
    """Per-window RMS level in dBFS of the decoded audio (for streams without the extension)."""
    span = max(1, math.ceil((analysis.end_us - origin_us) / window_us))
    energy = np.zeros(span)
    counts = np.zeros(span)
    decoder = av.CodecContext.create(
        {"opus": "libopus", "multiopus": "libopus"}.get(analysis.codec, analysis.codec), "r"
    )
    assert isinstance(decoder, AudioCodecContext)
    if analysis.extradata:
        decoder.extradata = analysis.extradata
    for frame in timed_frames(analysis):
        index = (frame.wall_us - origin_us) // window_us
        if not 0 <= index < span:
            continue
        try:
            decoded = decoder.decode(av.Packet(frame.data))
        except av.error.FFmpegError:
            continue
        for audio in decoded:
            samples = audio.to_ndarray().astype(np.float64)
            if samples.dtype.kind == "i" or np.abs(samples).max(initial=0) > 1.5:
                samples = samples / 32768.0
            energy[index] += float(np.square(samples).sum())
            counts[index] += samples.size
    with np.errstate(divide="ignore"):
        rms = np.sqrt(np.where(counts > 0, energy / np.maximum(counts, 1), 0.0))
        # RFC 6464 levels are dBov: 0 for a full-scale square wave; a full-scale sine is -3.
        return np.where(rms > 0, 20 * np.log10(np.maximum(rms, 1e-7)), SILENCE_DBOV)


def speech_flags(levels: np.ndarray, settings: Speaker) -> np.ndarray:
    """Speaking per window, with hysteresis between the on and off thresholds."""
    flags = np.zeros(len(levels), dtype=bool)
    speaking = False
    for index, level in enumerate(levels):
        if (speaking and level < settings.off_dbov) or (not speaking and level >= settings.on_dbov):
            speaking = not speaking
        flags[index] = speaking
    return flags


def speaker_timeline(tracks: Sequence[LevelTrack], settings: Speaker,
                     duration_us: int) -> list[SpeakerChange]:
    """Changes of the active speaker, in meeting time (µs from the meeting's start)."""
    if not tracks:
        return []
    window_us = tracks[0].window_us
    steps = max(1, math.ceil(duration_us / window_us))
    names = [t.participant for t in tracks]
    level = np.full((len(tracks), steps), SILENCE_DBOV)
    for row, track in enumerate(tracks):
        first = track.start_us // window_us
        take = track.levels[: max(0, steps - first)]
        level[row, first : first + len(take)] = take
    speaking = np.array([speech_flags(level[row], settings) for row in range(len(tracks))])
    hold = round(settings.hold * 1e6 / window_us)
    min_switch = round(settings.min_switch * 1e6 / window_us)
    current: int | None = None
    quiet_for = 0
    last_switch = -min_switch
    changes: list[SpeakerChange] = []
    for step in range(steps):
        talking = [row for row in range(len(tracks)) if speaking[row, step]]
        if current is not None and speaking[current, step]:
            quiet_for = 0
        else:
            quiet_for += 1
        candidate: int | None = None
        if talking:
            loudest = max(talking, key=lambda row: level[row, step])
            takes_floor = current is None or (
                loudest != current
                and (
                    quiet_for > hold
                    or level[loudest, step] >= level[current, step] + settings.hysteresis_db
                )
            )
            if takes_floor:
                candidate = loudest
        if candidate is not None and step - last_switch >= min_switch:
            current = candidate
            quiet_for = 0
            last_switch = step
            changes.append(SpeakerChange(step * window_us, names[candidate]))
    return changes
