"""A recording or meeting longer than ``MELTER_MAX_MEETING_HOURS`` is refused with its span,
and silence over a long pause is written as it goes, never built in memory first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest

from melter.limits import MAX_MEETING_HOURS_ENV
from tests.helpers.mjrwriter import T0_US, Stream

HOUR = 3600.0


def melter(*args: str | Path, env: dict[str, str] | None = None,
           peak: bool = False) -> subprocess.CompletedProcess[str]:
    """The CLI in a child under a 2 GiB address-space cap; with ``peak``, its peak resident
    memory (KiB) is printed last on stderr after ``PEAK``."""
    script = "from melter.cli import main\nmain()\n"
    if peak:
        script = ("import resource, sys\nfrom melter.cli import main\ntry:\n    main()\nfinally:\n"
                  "    print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
                  "file=sys.stderr)\n")
    return subprocess.run(
        ["prlimit", f"--as={2 << 30}", sys.executable, "-c", script, *map(str, args)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )


def paused_opus(folder: Path, name: str, pause_s: float, start_us: int = T0_US) -> Path:
    """Two seconds of Opus, ``pause_s`` without packets (the RTP clock running), two more."""
    stream = Stream.opus(4.0, start_us=start_us).pause(100, pause_s)
    return stream.write(folder / name)


def test_a_recording_longer_than_the_limit_is_refused(tmp_path: Path) -> None:
    path = paused_opus(tmp_path, "videoroom-1-user-7-1-audio-0.mjr", 13 * HOUR)
    out = tmp_path / "long.opus"
    result = melter("convert", path, "-o", out)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"melter: error: {path}: spans 13.0 h, over the 12 h limit "
                     f"({MAX_MEETING_HOURS_ENV})"], lines
    assert not out.exists()
    # The limit is the user's to raise.
    raised = melter("inspect", path, env={MAX_MEETING_HOURS_ENV: "14"})
    assert raised.returncode == 0, raised.stderr


def test_a_meeting_skips_an_over_long_recording_and_refuses_an_over_long_span(
        tmp_path: Path) -> None:
    folder = tmp_path / "meeting"
    folder.mkdir()
    Stream.opus(3.0).write(folder / "videoroom-1-user-7-1-audio-0.mjr")
    paused_opus(folder, "videoroom-1-user-8-2-audio-0.mjr", 13 * HOUR)
    planned = melter("plan", folder, "--layout", "grid", "--json")
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert [p["id"] for p in plan["participants"]] == ["7"]
    assert abs(plan["duration_s"] - 3.0) < 0.1
    assert any("spans 13.0 h, over the 12 h limit" in w for w in plan["warnings"]), plan["warnings"]
    # Two participants, each short, 13 hours apart: the meeting itself is too long.
    late = tmp_path / "late"
    late.mkdir()
    Stream.opus(3.0).write(late / "videoroom-1-user-7-1-audio-0.mjr")
    Stream.opus(3.0, start_us=T0_US + round(13 * HOUR * 1e6)).write(
        late / "videoroom-1-user-8-2-audio-0.mjr")
    refused = melter("plan", late, "--layout", "grid", "--json")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"melter: error: the meeting spans 13.0 h, over the 12 h limit ({MAX_MEETING_HOURS_ENV})"]
    bad = melter("plan", late, "--layout", "grid", env={MAX_MEETING_HOURS_ENV: "soon"})
    assert bad.returncode == 1 and "not a number of hours" in bad.stderr


@pytest.mark.parametrize("suffix", [".opus", ".wav"])
def test_silence_over_a_long_pause_is_streamed(tmp_path: Path, suffix: str) -> None:
    """Two hours of pause cost no more memory than none (before, .wav built every silent
    sample in one array: 690 MB for two hours of 48 kHz stereo)."""
    short = paused_opus(tmp_path, "short.mjr", 1.0)
    long = paused_opus(tmp_path, "long.mjr", 2 * HOUR)
    peaks = {}
    for path in (short, long):
        out = tmp_path / f"{path.stem}{suffix}"
        result = melter("convert", path, "-o", out, peak=True)
        assert result.returncode == 0, result.stderr[-2000:]
        peaks[path.stem] = int(result.stderr.split("PEAK")[-1].split()[0])
        with av.open(str(out)) as container:
            duration = float(container.streams.audio[0].duration
                              * container.streams.audio[0].time_base)
        pause = 1.0 if path is short else 2 * HOUR
        assert abs(duration - (4.0 + pause)) < 0.1, (path.name, duration)
    print(f"\n{suffix}: peak RSS {peaks['short'] / 1024:.0f} MiB (1 s pause), "
          f"{peaks['long'] / 1024:.0f} MiB (2 h pause)")
    assert peaks["long"] <= peaks["short"] + 30 * 1024
