"""An HLS output grows as an EVENT playlist while its meeting goes on, and becomes the VOD
playlist of the meeting's render when it ends.

The 60 s synthetic meeting of ``test_farm_progressive`` is cut where its recordings stood 40 s
and then 52 s in, and a prerender job runs on each cut: the playlist under the output's name
then holds the segments of every chunk finished (12 s chunks, 6 s segments), an EVENT
playlist with no end that FFmpeg plays, and each prerender only adds lines and files at its
end. Its pictures and sound are those of a post-hoc render of the finished recordings, at the
same times. The meeting's render then replaces it with a VOD playlist of the whole meeting,
and the live segments go.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from melter.farm.runner import PARTS_DIR
from melter.hls import parse_playlist
from tests.helpers.farm import (
    FarmHarness,
    audio_samples,
    frame_stats,
    harness,
    same_audio,
    write_long_meeting,
)
from tests.helpers.mjrwriter import T0_US
from tests.helpers.prefixes import cut_meeting, finish_meeting

__all__ = ["harness"]

SECONDS = 60.0
CHUNK = 10.0  # the hls preset rounds it up to whole segments: 12 s
FPS = 30
SEGMENT = 6
RATE = 48_000


def _ffmpeg_plays(playlist: Path, live: bool) -> tuple[int, int]:
    """FFmpeg reads the playlist as a player would, from its first segment (a live one until
    it has reloaded it and found nothing new); the video frames and audio samples it read.
    Any message at all fails."""
    options = ["-live_start_index", "0", "-m3u8_hold_counters", "2"] if live else []
    done = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", *options, "-i", str(playlist),
                           "-f", "framecrc", "-"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    rows = [line.split(",") for line in done.stdout.splitlines() if not line.startswith("#")]
    frames = sum(1 for row in rows if row[0].strip() == "0")
    samples = sum(int(row[3]) for row in rows if row[0].strip() == "1")
    return frames, samples


def _joined(playlist: Path, target: Path) -> Path:
    """The playlist's segments end to end (MPEG-TS joins by concatenation)."""
    with target.open("wb") as out:
        for name, _ in parse_playlist(playlist.read_text(), live=True).segments:
            out.write((playlist.parent / name).read_bytes())
    return target


def test_a_live_playlist_grows_during_the_meeting_and_becomes_its_vod(
        harness: FarmHarness, tmp_path: Path) -> None:
    finished = harness.storage / "meetings" / "finished"
    write_long_meeting(finished, SECONDS)
    live = harness.storage / "meetings" / "live"
    harness.start_workers(["w1", "w2"])
    playlist = harness.outputs / "meeting.m3u8"
    manifest = harness.outputs / "meeting.m3u8.manifest.json"

    seen: list[tuple[str, list[tuple[str, float]], dict[str, bytes]]] = []
    for cut_s, chunks in ((40.0, 2), (52.0, 3)):
        cut_meeting(finished, live, T0_US + round(cut_s * 1e6))
        pre = harness.submit(live, "meeting.m3u8", chunk_seconds=CHUNK, prerender=True)
        assert harness.wait(pre, timeout=240)["state"] == "done"
        text = playlist.read_text()
        listed = parse_playlist(text, live=True).segments
        files = {name: (harness.outputs / name).read_bytes() for name, _ in listed}
        print(f"cut at {cut_s} s: {len(listed)} segments "
              f"{[round(s, 6) for _, s in listed]}")
        # Settled: the cut less 8 s of plan horizon, 3 s (a quarter chunk) and 1 s; the
        # chunks of 12 s that end by then.
        assert "#EXT-X-PLAYLIST-TYPE:EVENT" in text and "#EXT-X-ENDLIST" not in text
        assert [s for _, s in listed] == [float(SEGMENT)] * (chunks * 12 // SEGMENT)
        info = json.loads(manifest.read_text())
        assert info["live"] is True and info["segments"] == len(listed)
        frames, samples = _ffmpeg_plays(playlist, live=True)
        assert frames == len(listed) * SEGMENT * FPS
        # The audio runs from the encoder's priming packet to the last packet that starts
        # within the last segment.
        assert abs(samples - 1024 - len(listed) * SEGMENT * RATE) <= 1024, samples
        seen.append((text, listed, files))

    # An EVENT playlist only grows: the first prerender's lines and files are still there.
    (first_text, first_listed, first_files), (second_text, second_listed, _) = seen
    assert second_text.startswith(first_text)
    assert second_listed[:len(first_listed)] == first_listed
    for name, data in first_files.items():
        assert (harness.outputs / name).read_bytes() == data, name
    live_copy = _joined(playlist, tmp_path / "live.ts")
    live_segments = [name for name, _ in second_listed]

    # After the meeting, from the finished recordings, in one pass: the live segments hold
    # the same pictures and the same sound at the same times.
    post = harness.submit(finished, "posthoc.mp4", chunk_seconds=0)
    assert harness.wait(post, timeout=240)["state"] == "done"
    reference = harness.outputs / "posthoc.mp4"
    ref, got = frame_stats(reference), frame_stats(live_copy)
    count = len(second_listed) * SEGMENT * FPS
    assert len(got.times) == count
    shift = got.times[0]  # MPEG-TS times start 1.4 s in
    assert np.allclose(got.times - shift, ref.times[:count], atol=0.001)
    assert float(np.abs(got.means - ref.means[:count]).max()) < 3.0
    heard, whole = audio_samples(live_copy), audio_samples(reference)
    # The TS holds the priming packet the MP4's edit list hides.
    heard = heard[:, 1024:1024 + count * RATE // FPS - 4096]
    print(same_audio(heard, whole[:, :heard.shape[1]]))

    # The meeting ends: its render takes the playlist's name and replaces it with a VOD one.
    finish_meeting(finished, live)
    # Once that render has reserved the name, a prerender still going on (here: one started
    # then, with chunks it could publish) leaves the playlist alone: the render is to
    # replace it, and a playlist written after its commit would undo it.
    store = harness.farm.store
    assert store.reserve_output(str(playlist), "the-meetings-render", 60)
    late = harness.submit(live, "meeting.m3u8", chunk_seconds=CHUNK, prerender=True)
    assert harness.wait(late, timeout=240)["state"] == "done"
    assert playlist.read_text() == second_text
    store.r.delete(f"{store.p}:outpath:{playlist}")
    final = harness.submit(live, "meeting.m3u8", chunk_seconds=CHUNK)
    done = harness.wait(final, timeout=240)
    assert done["state"] == "done", done
    assert done["outputs"] == [str(playlist)]
    text = playlist.read_text()
    assert "#EXT-X-PLAYLIST-TYPE:VOD" in text and "#EXT-X-ENDLIST" in text
    vod = parse_playlist(text).segments
    info = json.loads(manifest.read_text())
    assert "live" not in info and info["job"] == final
    frames, _ = _ffmpeg_plays(playlist, live=False)
    assert frames == round(sum(s for _, s in vod) * FPS)
    assert sum(s for _, s in vod) == pytest.approx(SECONDS, abs=2 / FPS)
    assert not any((harness.outputs / name).exists() for name in live_segments)
    timings = info["timings"]
    assert [c["kept"] for c in timings["chunks"]][:3] == [True] * 3
    assert not (harness.outputs / PARTS_DIR).exists()
