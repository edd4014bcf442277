"""Fuzzing with mutated copies of a real Janus recording.

The base inputs are the first seconds of one participant's audio and video from
``dev-three-party-vp8`` (real Janus 1.1.2 files; a prefix of an MJR is itself a valid MJR, and
keeps each case fast). Each case applies one seeded damage of ``fuzzcases`` — bit flips, byte
overwrites, truncation, inserted garbage, spliced frames, absurd length fields, damaged RTP
header fields, arrival times or a damaged JSON header — and runs ``analyze`` and ``convert`` in
this process. Only ``MelterError`` may come
out, no case may hang (per-case timeout), and what comes out must be self-consistent: gaps lie
inside the track and the silence written never exceeds the track's span.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from melter.convert import convert
from melter.errors import MelterError
from melter.track import analyze
from tests.helpers.fuzzcases import DAMAGE, Base, damage
from tests.helpers.mjrwriter import frame_offsets

SEED = 20261126
CASES = 200
CASE_LIMIT_S = 20
FIXTURES = Path(__file__).parent.parent / "fixtures" / "dev-three-party-vp8"
SHARED = Path("/work/shared/recordings/dev-three-party-vp8")
AUDIO = "videoroom-2001-user-501-1795700513534356-audio-0.mjr"
VIDEO = "videoroom-2001-user-501-1795700513534447-video-1.mjr"
#: How many frames of each recording the cases start from (6 s of audio, ~8 s of video).
PREFIX_FRAMES = {"audio": 300, "video": 250}
MUTATIONS = DAMAGE

#: Cases that hit a known melter bug (see the report): a single packet whose RTP timestamp
#: is corrupted drags the track's wall-clock offset by hours, so the analysis lists a gap far
#: longer than the track and conversion writes hours of silence.
WILD_TIMESTAMP = "bug: one packet with a corrupted RTP timestamp shifts the track by hours"
KNOWN_BUGS: dict[int, str] = {}


def _fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        FIXTURES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED / name, path)
    return path


@pytest.fixture(scope="module")
def bases() -> dict[str, tuple[bytes, list[int]]]:
    out = {}
    for kind, name in (("audio", AUDIO), ("video", VIDEO)):
        path = _fixture(name)
        offsets = frame_offsets(path)
        keep = PREFIX_FRAMES[kind]
        out[kind] = (path.read_bytes()[: offsets[keep]], offsets[:keep])
    return out


def mutate(rng: random.Random, data: bytes, offsets: list[int]) -> tuple[str, bytes]:
    """One random damage of a recording (``fuzzcases.damage``); ``offsets`` are its frame
    starts."""
    return damage(rng, Base("", data, offsets))


def case_input(case: int, bases: dict[str, tuple[bytes, list[int]]]) -> tuple[str, str, bytes]:
    rng = random.Random(SEED * 1000 + case)
    track = rng.choice(["audio", "video"])
    data, offsets = bases[track]
    kind, mutated = mutate(rng, data, offsets)
    return track, kind, mutated


def _case_params() -> list:
    params = []
    for case in range(CASES):
        marks = [pytest.mark.timeout(CASE_LIMIT_S)]
        if case in KNOWN_BUGS:
            marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[case]))
        params.append(pytest.param(case, marks=marks, id=f"case{case:03d}"))
    return params


@pytest.mark.parametrize("case", _case_params())
def test_mutated_recording(
    case: int, bases: dict[str, tuple[bytes, list[int]]], tmp_path: Path
) -> None:
    track, _, data = case_input(case, bases)
    path = tmp_path / f"{track}.mjr"
    path.write_bytes(data)
    try:
        analysis = analyze(path)
    except MelterError:
        return  # refused with a message: fine (conversion would refuse the same way)
    assert analysis.start_us <= analysis.end_us
    assert analysis.frames >= 0 and analysis.stats.packets > 0
    # gaps lie inside the track, so together they cannot outlast it
    assert sum(g.length_us for g in analysis.gaps) <= analysis.duration_us + 1000
    for gap in analysis.gaps:
        assert analysis.start_us - 1000 <= gap.start_us <= analysis.end_us + 1000
    for suffix in (".webm", ".opus") if track == "audio" else (".webm",):
        output = tmp_path / f"out{suffix}"
        try:
            report = convert([path], output)
        except MelterError:
            assert not output.exists()
            continue
        assert output.exists()
        assert report.silence_ms * 1000 <= report.duration_us + 100_000
        assert sum(report.frames_written.values()) <= analysis.stats.packets


def test_fuzz_cases_are_varied(bases: dict[str, tuple[bytes, list[int]]]) -> None:
    """The seeded cases cover every mutation on both tracks (guards the generator)."""
    seen = {case_input(case, bases)[:2] for case in range(CASES)}
    assert {kind for _, kind in seen} == set(MUTATIONS)
    assert {track for track, _ in seen} == {"audio", "video"}


CLI_CASES = [0, 1, 2, 3, 4, 5]


def test_cli_on_mutated_recordings(
    bases: dict[str, tuple[bytes, list[int]]], tmp_path: Path
) -> None:
    exe = shutil.which("melter")
    command = [exe] if exe else [sys.executable, "-m", "melter.cli"]
    codes = []
    for case in CLI_CASES:
        track, _, data = case_input(case, bases)
        path = tmp_path / f"case{case}-{track}.mjr"
        path.write_bytes(data)
        output = tmp_path / f"case{case}.webm"
        result = subprocess.run(
            [*command, "convert", str(path), "-o", str(output)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "Traceback" not in result.stderr + result.stdout, result.stderr
        assert result.returncode in (0, 1), result.stderr
        if result.returncode == 1:
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"melter: error: {path}")
            assert not output.exists()
        else:
            assert output.exists()
        codes.append(result.returncode)
    assert codes  # both outcomes are allowed; the point is: no crash, no traceback


#: The CI slice of ``bench/fuzz_bench.py``'s run (which takes 100 000 cases).
SLICE_SEED = 20261202
SLICE_CASES = 2000


def test_seeded_slice_of_the_damage_benchmark() -> None:
    """2 000 damaged prefixes of real Opus, VP8 and H.264 recordings (every damage kind of
    ``fuzzcases``, arrival times and the JSON header included) through inspect, convert and
    plan, each worker under a 3 GiB address-space cap and 20 s a case: no traceback, no hang,
    no cap hit, nothing inconsistent."""
    from tests.helpers import fuzzcases

    summary = fuzzcases.run(SLICE_SEED, SLICE_CASES, workers=2)
    print(f"\n{summary.cases} cases in {summary.seconds:.0f} s: {dict(summary.outcomes)}; "
          f"slowest {summary.slowest[:3]}")
    assert summary.cases == SLICE_CASES
    assert summary.failures == 0, summary.findings[:10]
    assert summary.outcomes["ok"] > SLICE_CASES // 4 and summary.outcomes["refused"] > 0
    kinds = {group.split("/")[1] for group in summary.by_kind}
    assert kinds == set(fuzzcases.DAMAGE)
    # Every codec gets through all three steps in most cases: a blanket refusal would hide
    # what the cases are for.
    for codec, _, _ in fuzzcases.BASES:
        ok = sum(c["ok"] for group, c in summary.by_kind.items() if group.startswith(codec))
        assert ok > SLICE_CASES // 6, (codec, ok)

