"""HLS output: a VOD playlist of 6 s H.264/AAC MPEG-TS segments cut from the render, not encoded
again, written whole or not at all.

A fixture meeting (dev-three-party-vp8, 23.96 s at 30 fps) is rendered as MP4 and as HLS with
the same layout; the playlist, read by FFmpeg and PyAV, must hold the MP4's frames and length,
each segment must start on a key frame and last 6 s (the last one less), and the farm, rendering
the playlist in chunks on a worker, must give the same playlist as the local render.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import av
import pytest
import yaml

from melter.errors import MelterError
from melter.hls import atomic_playlist, parse_playlist, place
from melter.layout.model import parse_layout
from melter.render import PRESETS, Preset, RenderResult, plan_render, preset_for, render
from tests.helpers.farm import SMALL_LAYOUT, FarmHarness, harness

__all__ = ["harness"]

FIXTURE = Path(__file__).parent.parent / "fixtures" / "dev-three-party-vp8"
FPS = 30
FRAME = 1 / FPS
SEGMENT = 6.0
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Through:
    """A playlist (or a file) as a player reads it."""

    frames: int
    video_start: float
    video_end: float  # the last frame's time plus one frame
    audio_start: float
    audio_end: float  # the last sample's end

    @property
    def video_s(self) -> float:
        return self.video_end - self.video_start

    @property
    def audio_s(self) -> float:
        """Audio from the first picture on: MPEG-TS has no edit list, so the AAC encoder's
        priming (1024 samples) lies before it, where an MP4 hides it."""
        return self.audio_end - self.video_start


@dataclass
class Segment:
    name: str
    extinf: float
    frames: int
    first_packet_key: bool
    first_frame_key: bool
    first_pts: float

    @property
    def seconds(self) -> float:
        return self.frames * FRAME


def read_through(path: Path) -> Through:
    with av.open(str(path)) as container:
        video = [(float(f.pts * f.time_base)) for f in container.decode(video=0)]
    with av.open(str(path)) as container:
        audio = [(float(f.pts * f.time_base), f.samples / f.sample_rate)
                 for f in container.decode(audio=0)]
    return Through(len(video), min(video), max(video) + FRAME, audio[0][0],
                   max(start + length for start, length in audio))


def segments(playlist: Path) -> list[Segment]:
    found = []
    for name, extinf in parse_playlist(playlist.read_text()).segments:
        with av.open(str(playlist.parent / name)) as container:
            stream = container.streams.video[0]
            packets = [p for p in container.demux(stream) if p.size]
            start = float(min(p.pts for p in packets) * stream.time_base)
        with av.open(str(playlist.parent / name)) as container:
            first = next(container.decode(video=0))
        found.append(Segment(name, extinf, len(packets), packets[0].is_keyframe,
                             bool(first.key_frame), start))
    return found


def ffmpeg_reads(playlist: Path) -> None:
    done = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(playlist),
                           "-f", "null", "-"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def check_segments(found: list[Segment]) -> None:
    for segment in found:
        assert segment.first_packet_key and segment.first_frame_key, segment
    for segment in found[:-1]:
        assert abs(segment.extinf - SEGMENT) <= FRAME + 1e-6, segment
        assert abs(segment.seconds - SEGMENT) <= FRAME + 1e-6, segment
    assert 0 < found[-1].extinf <= SEGMENT + FRAME
    for segment in found:
        assert abs(segment.extinf - segment.seconds) < 1e-3, segment


def modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}


@dataclass
class Local:
    result: RenderResult
    mp4: Path
    playlist: Path


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Local:
    """The meeting rendered as MP4 and as HLS by the same plan."""
    folder = tmp_path_factory.mktemp("hls")
    planned = plan_render([FIXTURE], parse_layout(SMALL_LAYOUT))
    mp4, playlist = folder / "meeting.mp4", folder / "out" / "meeting.m3u8"
    result = render(planned, [(mp4, PRESETS["mp4"]), (playlist, preset_for(playlist, None))])
    return Local(result, mp4, playlist)


def test_playlist_holds_the_mp4_render(local: Local) -> None:
    text = local.playlist.read_text()
    assert "#EXT-X-PLAYLIST-TYPE:VOD" in text.splitlines()
    assert text.splitlines()[-1] == "#EXT-X-ENDLIST"
    ffmpeg_reads(local.playlist)
    found = segments(local.playlist)
    assert [s.name for s in found] == [f"meeting-{i:05d}.ts" for i in range(len(found))]
    assert sorted(p.name for p in local.playlist.parent.iterdir()) == sorted(
        [local.playlist.name] + [s.name for s in found])  # nothing staged is left
    check_segments(found)
    total = sum(s.extinf for s in found)
    span = local.result.frames / FPS
    mp4 = read_through(local.mp4)
    hls = read_through(local.playlist)
    print(f"\nsegments (EXTINF s): {[s.extinf for s in found]}; frames: {[s.frames for s in found]}"
          f"\nEXTINF total {total:.6f} s; meeting {local.result.duration_s} s, rendered "
          f"{local.result.frames} frames = {span:.6f} s; MP4 video {mp4.video_s:.6f} s"
          f"\nframes: MP4 {mp4.frames}, through the playlist {hls.frames}"
          f"\naudio: MP4 {mp4.audio_s:.6f} s, through the playlist {hls.audio_s:.6f} s "
          f"(video {hls.video_s:.6f} s)")
    assert abs(total - span) <= FRAME
    assert abs(total - local.result.duration_s) <= FRAME
    assert abs(total - mp4.video_s) <= FRAME
    assert hls.frames == mp4.frames == local.result.frames
    assert abs(hls.video_s - mp4.video_s) < 1e-3
    assert abs(hls.audio_s - hls.video_s) <= FRAME
    assert abs(hls.audio_s - mp4.audio_s) < 1e-3  # the MP4's audio, sample for sample in time
    # Each segment starts where its first frame is due on the meeting's clock.
    starts = [s.first_pts - found[0].first_pts for s in found]
    assert all(abs(a - i * SEGMENT) < 1e-3 for i, a in enumerate(starts)), starts


def test_hls_preset_needs_a_playlist_name(tmp_path: Path) -> None:
    assert preset_for(tmp_path / "a.m3u8", "hls").hls
    with pytest.raises(MelterError):
        preset_for(tmp_path / "a.mp4", "hls")
    with pytest.raises(MelterError):
        preset_for(tmp_path / "a.m3u8", "mp4")
    assert PRESETS["hls"].parts.suffix == ".mp4" and not PRESETS["hls"].parts.hls
    assert PRESETS["hls"].encoder_properties(25)["g"] == "150"


def _melter(*args: str, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from melter.cli import main; main()", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, umask=umask)


def test_cli_writes_then_replaces_a_playlist(tmp_path: Path, local: Local) -> None:
    layout = tmp_path / "small.yaml"
    layout.write_text(yaml.safe_dump(SMALL_LAYOUT))
    out = tmp_path / "out" / "meeting.m3u8"
    done = _melter("render", str(FIXTURE), "--layout", str(layout), "-o", str(out),
                   umask=0o027)
    assert done.returncode == 0, done.stderr
    first = segments(out)
    assert modes(out.parent) == {name: 0o640 for name in [out.name, *(s.name for s in first)]}
    assert [s.extinf for s in first] == [s.extinf for s in segments(local.playlist)]
    # Rendered again: the new segments take free names before the playlist is replaced, and
    # the old ones go only then.
    done = _melter("render", str(FIXTURE), "--layout", str(layout), "-o", str(out))
    assert done.returncode == 0, done.stderr
    second = segments(out)
    assert [s.name for s in second] == [f"meeting-2-{i:05d}.ts" for i in range(len(second))]
    assert sorted(os.listdir(out.parent)) == sorted([out.name, *(s.name for s in second)])
    ffmpeg_reads(out)
    print(f"\nfirst render: {[s.name for s in first]}; again: {[s.name for s in second]}")


def test_failed_render_leaves_the_playlist(tmp_path: Path, local: Local) -> None:
    out = tmp_path / "meeting.m3u8"
    planned = plan_render([FIXTURE], parse_layout(SMALL_LAYOUT))
    with atomic_playlist(out, 6) as staged:
        staged.write_bytes(local.mp4.read_bytes())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    broken = Preset("hls", ".m3u8", None, None, {**PRESETS["hls"].properties,
                                                  "vcodec": "no-such-codec"},
                    keyframe_seconds=6, hls=True)
    with pytest.raises(MelterError):
        render(planned, [(out, broken)])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def _staged(folder: Path, count: int) -> None:
    folder.mkdir()
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:6",
             "#EXT-X-PLAYLIST-TYPE:VOD"]
    for i in range(count):
        (folder / f"s-{i:05d}.ts").write_bytes(b"segment %d" % i)
        lines += ["#EXTINF:6.000000,", f"s-{i:05d}.ts"]
    (folder / "s.m3u8").write_text("\n".join([*lines, "#EXT-X-ENDLIST", ""]))


def test_place_never_overwrites(tmp_path: Path) -> None:
    staging, target = tmp_path / "staging", tmp_path / "target"
    _staged(staging, 3)
    target.mkdir()
    (target / "talk-00001.ts").write_bytes(b"someone else's")
    src = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    dst = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # A segment name taken: the segments take the next free stem.
        names = place(src, "s.m3u8", dst, "talk.m3u8", replace=False, mode=0o640)
        assert names == ["talk-2-00000.ts", "talk-2-00001.ts", "talk-2-00002.ts"]
        assert (target / "talk-00001.ts").read_bytes() == b"someone else's"
        assert [n for n, _ in parse_playlist((target / "talk.m3u8").read_text()).segments] \
            == names
        assert modes(target)["talk.m3u8"] == 0o640
        # The playlist's name taken: refused, and nothing of the attempt is left behind.
        _staged(staging / "again", 2)
        again = os.open(staging / "again", os.O_RDONLY | os.O_DIRECTORY)
        before = sorted(os.listdir(target))
        try:
            with pytest.raises(FileExistsError):
                place(again, "s.m3u8", dst, "talk.m3u8", replace=False, mode=0o640)
            # A segment name given and taken: refused the same way.
            with pytest.raises(FileExistsError):
                place(again, "s.m3u8", dst, "other.m3u8", replace=False, mode=0o640,
                      stem="talk")
        finally:
            os.close(again)
        assert sorted(os.listdir(target)) == before
    finally:
        os.close(src)
        os.close(dst)


def test_farm_chunked_playlist_equals_local(harness: FarmHarness, local: Local) -> None:
    meeting = harness.meeting("dev-three-party-vp8")
    harness.start_worker("w1")
    chunked = harness.submit(meeting, "meeting.m3u8", chunk_seconds=5)
    info = harness.wait(chunked, timeout=240)
    assert info["state"] == "done", info
    # 5 s chunks become 6 s ones (a segment each), cut where segments start.
    ranges = sorted(u["frames"] for name, u in info["units"].items() if name.startswith("v"))
    assert info["chunks"] == len(ranges) >= 3
    assert all(first % (SEGMENT * FPS) == 0 for first, _ in ranges), ranges
    single = harness.submit(meeting, "meeting.m3u8", chunk_seconds=0,
                            outputs=[{"path": str(harness.outputs / "meeting.m3u8"),
                                      "preset": "hls"}])
    info_single = harness.wait(single, timeout=240)
    assert info_single["state"] == "done", info_single
    reference = segments(local.playlist)
    ref = read_through(local.playlist)
    for playlist, stem in ((harness.outputs / "meeting.m3u8", "meeting"),
                           (harness.outputs / "meeting.v2.m3u8", "meeting.v2")):
        ffmpeg_reads(playlist)
        found = segments(playlist)
        assert [s.name for s in found] == [f"{stem}-{i:05d}.ts" for i in range(len(found))]
        check_segments(found)
        through = read_through(playlist)
        print(f"\n{playlist.name} ({len(ranges)} chunks)" if stem == "meeting" else
              f"\n{playlist.name} (one piece)",
              f"segments {[s.extinf for s in found]}, EXTINF total "
              f"{sum(s.extinf for s in found):.6f} s, frames {through.frames}, video "
              f"{through.video_s:.6f} s, audio {through.audio_s:.6f} s")
        assert [s.extinf for s in found] == [s.extinf for s in reference]
        assert [s.frames for s in found] == [s.frames for s in reference]
        assert through.frames == ref.frames
        assert abs(through.video_s - ref.video_s) < 1e-3
        assert abs(through.audio_s - ref.audio_s) <= FRAME
        manifest = json.loads((harness.outputs / f"{playlist.name}.manifest.json").read_text())
        assert manifest["output"]["segments"] == [s.name for s in found]
        assert manifest["output"]["preset"] == "hls"
    leftovers = [p.name for p in harness.outputs.iterdir()
                 if p.name.startswith(".") and p.name != ".melter-tmp"]
    assert leftovers == []
