"""A long meeting rendered in chunks on several workers equals the single-pass render.

A 90 s synthetic meeting of 10 fps publishers (three people joining and leaving, so there are
scene boundaries to cut at; one of them flashes white and doubles its tone every 10 s, once
right at the first chunk's end) is rendered three ways on the farm: in one piece, in chunks by
one worker, and in chunks by two workers. The chunked files must have the single pass's frame
count, its audio (the same sound at the same samples), the same picture at every frame, and the same
flash-to-tone sync, each flash on the output frame nearest its picture; two workers must beat
one.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np

from tests.helpers.farm import (
    FRAME,
    MARKER_AT,
    VIDEO_LAG,
    FarmHarness,
    FrameStats,
    audio_samples,
    frame_stats,
    harness,
    same_audio,
    tone_onsets,
    video_frame_count,
    write_long_meeting,
)
from tests.helpers.mediacheck import top_level_boxes

__all__ = ["harness"]

SECONDS = 90.0
CHUNK = 25.0


def _render(harness: FarmHarness, meeting: Path, name: str, chunk: float) -> tuple[dict, float]:
    began = time.monotonic()
    job = harness.submit(meeting, name, chunk_seconds=chunk)
    info = harness.wait(job, timeout=240)
    return info, time.monotonic() - began


def _sync(path: Path, stats: FrameStats) -> list[float]:
    """Flash-to-tone offsets (s) of the markers of person 601."""
    flashes = stats.white_onsets()
    tones = tone_onsets(path, 800.0)
    assert len(flashes) == len(tones) == int(SECONDS // 10), (flashes, tones)
    return [round(tone - flash, 4) for flash, tone in zip(flashes, tones, strict=True)]


def test_chunked_render_equals_single_pass_and_scales(harness: FarmHarness) -> None:
    meeting = harness.storage / "meetings" / "long"
    write_long_meeting(meeting, SECONDS)
    harness.start_worker("w1")
    one, one_s = _render(harness, meeting, "chunked-1.mp4", CHUNK)
    harness.start_worker("w2")
    two, two_s = _render(harness, meeting, "chunked-2.mp4", CHUNK)
    single, single_s = _render(harness, meeting, "single.mp4", 0)
    print(f"\n{SECONDS:.0f} s meeting: single pass {single_s:.1f} s; in {two['chunks']} chunks: "
          f"1 worker {one_s:.1f} s, 2 workers {two_s:.1f} s")
    for info in (one, two, single):
        assert info["state"] == "done", info
    assert single["chunks"] == 0 and list(single["units"]) == ["main"]
    assert one["chunks"] == two["chunks"] >= 3
    # The chunks were cut at scene boundaries (someone joins at 27 s) and ran on both workers.
    ranges = sorted(u["frames"] for name, u in two["units"].items() if name.startswith("v"))
    assert ranges[0] == [0, round(SECONDS * 0.3 / FRAME) - 1]
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(ranges))
    assert {u["worker"] for name, u in two["units"].items() if name != "main"} == {
        "w1@test", "w2@test"}
    reference = harness.outputs / "single.mp4"
    frames = video_frame_count(reference)
    assert abs(frames * FRAME - SECONDS) <= 2 * FRAME
    ref_audio = audio_samples(reference)
    ref = frame_stats(reference)
    ref_sync = _sync(reference, ref)
    # One marker's first picture comes right at the first chunk's end: the chunk border.
    border = (ranges[0][1] + 1) * FRAME
    assert any(abs(flash - border) < 0.001 for flash in ref.white_onsets()), border
    assert abs(border - (MARKER_AT + 20)) < 0.001
    for name in ("chunked-1.mp4", "chunked-2.mp4"):
        path = harness.outputs / name
        assert video_frame_count(path) == frames
        stats = frame_stats(path)
        assert len(stats.times) == frames
        assert np.allclose(stats.times, ref.times, atol=0.001)  # every frame at the same time
        assert float(np.abs(stats.means - ref.means).max()) < 3.0  # showing the same picture
        audio = audio_samples(path)
        # The chunks' audio is the single pass's samples (tests/render/test_audio_windows.py)
        # encoded in AAC pieces joined by copying packets (tests/render/test_splice.py): the
        # same sound at the same samples, within the difference of two encodings.
        print(name, same_audio(audio, ref_audio))
        sync = _sync(path, stats)
        assert sync == ref_sync
        # Each marker picture, taken 10 ms after an output frame's time, shows from that
        # frame: the tone starts 10 ms after the flash (within the 2 ms onset measure), and
        # so within half an output frame (+3 ms), the promised sync.
        assert all(abs(offset - VIDEO_LAG) <= 0.003 for offset in sync), sync
        assert all(abs(offset) <= FRAME / 2 + 0.003 for offset in sync), sync
        manifest = json.loads((harness.outputs / f"{name}.manifest.json").read_text())
        assert len(manifest["timings"]["chunks"]) == two["chunks"]
        boxes = top_level_boxes(path)  # as melt writes a single pass: playable while loading
        assert boxes.index("moov") < boxes.index("mdat"), boxes
    assert two_s < one_s, (one_s, two_s)
    print(f"flash-to-tone offsets (s): {[float(x) for x in ref_sync]}")
