"""Chunks rendered while a meeting goes on stand for the finished meeting's chunks.

A 60 s synthetic meeting (three people joining and leaving; person 601 flashes white and
doubles its tone every 10 s) is cut where its recordings stood 40 s in, as Janus had written
them then. A prerender job (``prerender: true``) renders the chunks those recordings already
hold for good; one of its two workers is killed while it renders, and only that unit runs
again. Then the recordings grow to their full length, and the meeting's render reuses every
chunk the prerender kept: only the rest is rendered. The result equals a single-pass render
of the finished recordings made after the meeting: frame count, the picture at every frame,
the flash-to-tone sync, and the audio (the same sound at the same samples, AAC pieces joined
by copying packets, within the difference of two encodings).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from melter.farm.runner import PARTS_DIR
from tests.helpers.farm import (
    FRAME,
    FarmHarness,
    audio_samples,
    frame_stats,
    harness,
    same_audio,
    tone_onsets,
    video_frame_count,
    write_long_meeting,
)
from tests.helpers.mjrwriter import T0_US
from tests.helpers.prefixes import cut_meeting, finish_meeting

__all__ = ["harness"]

SECONDS = 60.0
CHUNK = 10.0
CUT_S = 40.0


def _units(info: dict, kind: str) -> dict[str, dict]:
    return {name: u for name, u in info["units"].items() if name.startswith(kind)}


def _kill_while_rendering(harness: FarmHarness, job: str, victim_name: str) -> str:
    """Kill ``victim_name``'s worker once it renders a unit of ``job``; that unit's name."""
    victim = next(w for w in harness.workers if w.name == f"{victim_name}@test")

    def running() -> str | None:
        for name, unit in harness.status(job).get("units", {}).items():
            if (name != "main" and unit.get("state") == "running"
                    and unit.get("worker", "").startswith(victim_name)):
                return name
        return None

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if running() is not None:
            time.sleep(0.3)  # well inside melt
            harness.kill_group(victim)
            # The unit it held at the kill (a short one may have ended in the meantime).
            name = running()
            if name is not None:
                return name
            raise AssertionError(f"{victim_name} was killed between two units of {job}")
        time.sleep(0.05)
    raise AssertionError(f"{victim_name} rendered no unit of {job}")


def _meeting_at(harness: FarmHarness, cut_s: float) -> tuple[Path, Path]:
    """The finished meeting's folder, and the folder of the same meeting ``cut_s`` in."""
    finished = harness.storage / "meetings" / "finished"
    write_long_meeting(finished, SECONDS)
    live = harness.storage / "meetings" / "live"
    cut_meeting(finished, live, T0_US + round(cut_s * 1e6))
    return finished, live


def _sync(path: Path) -> list[float]:
    flashes = frame_stats(path).white_onsets()
    tones = tone_onsets(path, 800.0)
    assert len(flashes) == len(tones) == int(SECONDS // 10), (flashes, tones)
    return [round(tone - flash, 4) for flash, tone in zip(flashes, tones, strict=True)]


def test_chunks_rendered_during_the_meeting_are_reused_and_equal_a_post_hoc_render(
        harness: FarmHarness) -> None:
    finished, live = _meeting_at(harness, CUT_S)
    harness.start_workers(["w1", "w2"])

    # While the meeting goes on: the settled chunks, one worker killed in the middle.
    pre = harness.submit(live, "meeting.mp4", chunk_seconds=CHUNK, prerender=True)
    killed = _kill_while_rendering(harness, pre, "w1")
    harness.start_worker("w3")
    info = harness.wait(pre, timeout=240)
    assert info["state"] == "done", info
    video, audio = _units(info, "v"), _units(info, "a")
    # Settled: 40 s less the plan's horizon (8 s), a quarter chunk and a second: 28.5 s,
    # so the chunks ending by then: 0-10 s and 10-18 s (cut where 602 joins); the next one
    # ends at 30 s, where 603 joins.
    assert sorted(u["frames"] for u in video.values()) == [[0, 299], [300, 539]], video
    assert sorted(audio) == sorted(name.replace("v", "a") for name in video)
    attempts = {name: u["attempts"] for name, u in info["units"].items() if name != "main"}
    assert attempts.pop(killed) == 2, (killed, info["units"][killed])
    assert set(attempts.values()) == {1}, attempts
    assert not (harness.outputs / "meeting.mp4").exists()
    parts = harness.outputs / PARTS_DIR
    assert len(list(parts.glob("*.mp4"))) == 2 and len(list(parts.glob("*.mka"))) == 2
    # The sweeper knows the folder: it goes if the meeting's render never comes.
    assert [f for f, _ in harness.farm.store.stale_parts(time.time())] == [str(parts)]

    # The meeting ends: the recordings grow to their whole length.
    finish_meeting(finished, live)
    final = harness.submit(live, "meeting.mp4", chunk_seconds=CHUNK)
    done = harness.wait(final, timeout=240)
    assert done["state"] == "done", done
    manifest = json.loads((harness.outputs / "meeting.mp4.manifest.json").read_text())
    chunks, sounds = manifest["timings"]["chunks"], manifest["timings"]["audio"]
    assert [c["kept"] for c in chunks] == [True, True] + [False] * (len(chunks) - 2)
    assert [s["kept"] for s in sounds] == [True, True] + [False] * (len(sounds) - 2)
    assert chunks[1]["frames"] == [300, 539] and len(chunks) == 6
    # The kept chunks were taken at planning: only the other four have units.
    assert sorted(_units(done, "v")) == ["v0.2", "v0.3", "v0.4", "v0.5"], done["units"]
    assert sorted(_units(done, "a")) == ["a0.2", "a0.3", "a0.4", "a0.5"], done["units"]
    # The kept chunks were used up by the join.
    assert not parts.exists()

    # After the meeting, from the finished recordings, in one pass.
    post = harness.submit(finished, "posthoc.mp4", chunk_seconds=0)
    assert harness.wait(post, timeout=240)["state"] == "done"
    result, reference = harness.outputs / "meeting.mp4", harness.outputs / "posthoc.mp4"
    frames = video_frame_count(reference)
    assert abs(frames * FRAME - SECONDS) <= 2 * FRAME
    assert video_frame_count(result) == frames
    ref, got = frame_stats(reference), frame_stats(result)
    assert np.allclose(got.times, ref.times, atol=0.001)
    assert float(np.abs(got.means - ref.means).max()) < 3.0
    assert _sync(result) == _sync(reference)
    print(same_audio(audio_samples(result), audio_samples(reference)))


def test_a_chunk_two_jobs_need_at_once_is_rendered_once(harness: FarmHarness) -> None:
    """The meeting ends while a prerender renders its first chunk: the meeting's render waits
    for that chunk instead of rendering it a second time."""
    _, live = _meeting_at(harness, CUT_S)
    # Two workers render the prerender's chunks, the third takes the render. 1280x720: a
    # chunk takes long enough for the render to come while it renders.
    harness.start_workers(["w1", "w2", "w3"])
    pre = harness.submit(live, "meeting.mp4", chunk_seconds=CHUNK, prerender=True,
                         layout="grid")
    harness.wait_until(
        lambda: harness.status(pre).get("units", {}).get("v0.0", {}).get("state") == "running",
        120, "the prerender's first chunk")
    final = harness.submit(live, "meeting.mp4", chunk_seconds=CHUNK, layout="grid")
    done = harness.wait(final, timeout=300)
    assert done["state"] == "done", done
    assert harness.wait(pre, timeout=240)["state"] == "done"
    fields = {job: harness.farm.store.job(job) for job in (pre, final)}
    rendered = fields[pre]["part:v0.0"]
    reused = fields[final]["part:v0.0"]
    print(f"prerender v0.0 {rendered[:20]}..., render v0.0 {reused[:20]}...")
    assert rendered.startswith("rendered:") and reused == "reused:" + rendered[9:]
    manifest = json.loads((harness.outputs / "meeting.mp4.manifest.json").read_text())
    assert manifest["timings"]["chunks"][0]["kept"] is True
    # The render took the chunk after the prerender's unit rendered it: its own unit waited
    # for it, or (the chunk kept by the time the render planned) its plan took it.
    rendered_at = float(harness.farm.store.unit(pre, "v0.0")["finished"])
    taker = harness.farm.store.unit(final, "v0.0") or harness.farm.store.unit(final, "main")
    assert rendered_at <= float(taker["finished"]), taker
