"""Every real Janus recording converts, and is measured against janus-pp-rec and the truth.

The recordings (tests/fixtures/, made by Janus 1.1.2) carry sync markers: every 5 s of a
participant's media clock the picture flashes white and the tone doubles for 100 ms.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from melter.convert import convert
from melter.mjr.reader import MjrReader
from melter.track import analyze
from tests.helpers.mediacheck import (
    decode_audio,
    flash_onsets,
    pair_offsets,
    tone_doubling_onsets,
    video_frames_mean,
)

FIXTURES = Path(__file__).parent.parent / "fixtures"
MEETINGS = ["dev-three-party-vp8", "dev-two-party-h264", "dev-turn-taking-vp8"]
RECORDINGS = sorted(p for meeting in MEETINGS for p in (FIXTURES / meeting).glob("*.mjr"))
JANUS_PP_REC = shutil.which("janus-pp-rec")
needs_pp_rec = pytest.mark.skipif(JANUS_PP_REC is None, reason="janus-pp-rec not installed")


def manifest(meeting: str) -> dict:
    return json.loads((FIXTURES / meeting / "manifest.json").read_text())


def participant_files() -> list[tuple[str, dict, Path, Path]]:
    cases = []
    for meeting in MEETINGS:
        data = manifest(meeting)
        for person in data["participants"]:
            files = [f for f in data["files"] if f["participant"] == person["name"]]
            audio = next(FIXTURES / meeting / f["mjr"] for f in files if f["kind"] == "audio")
            video = next(FIXTURES / meeting / f["mjr"] for f in files if f["kind"] == "video")
            cases.append((meeting, person, audio, video))
    return cases


def ffprobe_duration(path: Path) -> float:
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(path)],
        capture_output=True, text=True, check=True,
    )
    return float(result.stdout.strip())


def ffmpeg_errors(path: Path) -> str:
    result = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "null", "-"],
        capture_output=True, text=True,
    )
    return result.stderr.strip()


def output_name(path: Path, codec: str) -> str:
    return {"opus": ".opus", "vp8": ".webm", "h264": ".mp4"}[codec]


def wall_span_from_arrivals(path: Path) -> float:
    """The recording's length by the Janus host's clock: first to last arrival + one packet.

    Independent of Melter's timing model: only the arrival stamps Janus wrote.
    """
    reader = MjrReader(path)
    arrivals = [frame.arrival_ms for frame in reader.frames()]
    assert arrivals and all(a is not None for a in arrivals)
    return (max(arrivals) - min(arrivals)) / 1000 + 0.020  # type: ignore[type-var,operator]


@needs_pp_rec
@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.name[10:40])
def test_packet_count_matches_janus_pp_rec(path: Path) -> None:
    result = subprocess.run([JANUS_PP_REC, "-p", str(path)], capture_output=True, text=True)
    counted = re.search(r"Counted (\d+) RTP packets", result.stdout + result.stderr)
    assert counted, result.stderr
    assert analyze(path).stats.packets == int(counted.group(1))


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.name[10:40])
def test_recording_converts_cleanly(path: Path, tmp_path: Path) -> None:
    analysis = analyze(path)
    output = tmp_path / f"out{output_name(path, analysis.codec)}"
    report = convert([path], output)
    assert ffmpeg_errors(output) == ""
    if analysis.kind == "audio":
        decoded = decode_audio(output)
        truth = wall_span_from_arrivals(path)
        assert abs(decoded.duration - truth) < 0.040, (decoded.duration, truth)
        assert abs(decoded.duration - analysis.duration_us / 1e6) < 0.040
        assert report.frames_written["audio"] == analysis.stats.packets
    else:
        assert report.frames_written["video"] == analysis.frames


@needs_pp_rec
@pytest.mark.parametrize("path", [p for p in RECORDINGS if "video" in p.name],
                         ids=lambda p: p.name[10:40])
def test_video_duration_matches_janus_pp_rec(path: Path, tmp_path: Path) -> None:
    analysis = analyze(path)
    suffix = output_name(path, analysis.codec)
    ours = tmp_path / f"melter{suffix}"
    theirs = tmp_path / f"pprec{suffix}"
    convert([path], ours)
    subprocess.run([JANUS_PP_REC, str(path), str(theirs)], capture_output=True, check=True)
    assert abs(ffprobe_duration(ours) - ffprobe_duration(theirs)) < 0.040


@needs_pp_rec
def test_pause_keeps_wall_clock_length_where_janus_pp_rec_shortens(tmp_path: Path) -> None:
    """X pauses its audio for 2 s: we keep the 2 s as silence; janus-pp-rec drops them."""
    data = manifest("dev-three-party-vp8")
    entry = next(f for f in data["files"] if f["participant"] == "X" and f["kind"] == "audio")
    path = FIXTURES / "dev-three-party-vp8" / entry["mjr"]
    ours, theirs = tmp_path / "melter.opus", tmp_path / "pprec.opus"
    convert([path], ours)
    subprocess.run([JANUS_PP_REC, str(path), str(theirs)], capture_output=True, check=True)
    truth = wall_span_from_arrivals(path)
    our_audio, their_audio = decode_audio(ours), decode_audio(theirs)
    assert abs(our_audio.duration - truth) < 0.040
    assert truth - their_audio.duration > 1.9  # the pause vanished from janus-pp-rec's file
    # The pause is silence in ours, at the right place (10-12 s of X's clock).
    rate = our_audio.rate
    quiet = our_audio.samples[int(10.2 * rate) : int(11.8 * rate)]
    loud = our_audio.samples[int(8.0 * rate) : int(9.5 * rate)]
    assert abs(quiet).max() < 0.01 < abs(loud).max()


@pytest.mark.parametrize(
    ("meeting", "person", "audio", "video"),
    participant_files(),
    ids=lambda v: v["name"] if isinstance(v, dict) else (v if isinstance(v, str) else ""),
)
@pytest.mark.parametrize("suffix", [".mkv", ".mp4"])
def test_merged_participant_is_in_sync(
    meeting: str, person: dict, audio: Path, video: Path, suffix: str, tmp_path: Path
) -> None:
    if suffix == ".mp4" and "vp8" in meeting:
        pytest.skip("VP8 does not go into MP4 without re-encoding")
    output = tmp_path / f"merged{suffix}"
    convert([audio, video], output)
    assert ffmpeg_errors(output) == ""
    flashes = flash_onsets(video_frames_mean(output))
    tones = tone_doubling_onsets(decode_audio(output), person["tone_hz"])
    offsets = pair_offsets(flashes, tones)
    assert len(offsets) >= 1, (flashes, tones)
    # Every 5 s marker in the media clock that had sound must pair up.
    assert len(offsets) >= len(tones) - 1
    assert max(abs(o) for o in offsets) < 0.020, [round(o * 1000, 1) for o in offsets]


def test_inspect_reports_the_sync_facts_of_a_real_meeting() -> None:
    """The per-track report: offsets between tracks, gaps with causes, key frames, skew."""
    import sys

    folder = FIXTURES / "dev-three-party-vp8"
    files = sorted(folder.glob("*-501-*.mjr"))
    result = subprocess.run(
        [sys.executable, "-m", "melter.cli", "inspect", "--json", *map(str, files)],
        capture_output=True, text=True, check=True,
    )
    audio, video = json.loads(result.stdout)
    data = manifest("dev-three-party-vp8")
    truth = {f["mjr"]: f for f in data["files"]}
    for report in (audio, video):
        entry = truth[Path(report["file"]).name]
        assert report["packets"] == entry["packets"]
        assert report["header"]["first_packet_us"] == entry["mjr_first_packet_us"]
        # The track starts within 25 ms before its first packet arrived (network delay of
        # the first packet against the least-delayed ones).
        assert -25 <= report["start_minus_u_ms"] <= 0
        assert report["lost"] == 0 and report["duplicates"] == 0
        assert abs(report["skew_ppm"]) < 100
    # X's 2 s audio pause at 10 s of its clock, with its cause.
    assert [(g["cause"], round(g["length_ms"] / 1000, 1)) for g in audio["gaps"]] == [
        ("pause", 2.0)]
    assert abs(audio["gaps"][0]["start_s"] - 10.0) < 0.05
    assert audio["audio_level_extension"] == 2 and "-13" in audio["audio_levels_dbov"]
    # Key frames as the manifest lists them (offsets in the file's arrival clock).
    expected = [k / 1000 for k in truth[Path(video["file"]).name]["rtp"]["keyframe_offsets_ms"]]
    assert len(video["keyframes_s"]) == len(expected)
    assert all(abs(a - b) < 0.1 for a, b in zip(video["keyframes_s"], expected, strict=True))
    assert video["resolutions"] == [{"at_s": 0.0, "width": 320, "height": 240}]
    # Audio and video of one participant start within a frame of each other.
    assert abs(audio["start_us"] - video["start_us"]) < 34_000
