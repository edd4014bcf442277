"""A melt that stops responding is killed and reported; it never hangs its caller.

melt 7.12 can hang for good before its first frame (its avformat consumer's thread can end
before the consumer is marked running: the output is closed empty and melt waits forever).
That cannot be produced on demand, so the hung melt here is a stand-in executable chosen
through ``MELTER_MELT``: it prints melt's ``-progress2`` lines, leaves an empty output like
the real hang, starts a child process, and sleeps. Everything else is the real melt.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest

from melter.engine.mlt import EXIT_ENV, MELT_ENV, STALL_ENV, RenderError, melt_watch, run_melt
from melter.layout.model import load_layout
from melter.meeting import discover
from melter.render import PRESETS, plan_render, render
from tests.helpers.farm import FarmHarness, test_redis_url

FIXTURE = Path(__file__).parent.parent / "fixtures" / "dev-three-party-vp8"
#: Frames of the fixture's render at 30 fps.
FIXTURE_FRAMES = 719

STAND_IN = """#!{python}
import os, subprocess, sys, time
from pathlib import Path

args = sys.argv[1:]
once = os.environ.get("STAND_IN_STALL_ONCE")
if once and ("vn=1" not in args or os.path.exists(once)):
    real = os.environ["STAND_IN_MELT"]
    os.execv(real, [real, *args])
if once:
    Path(once).write_text(str(os.getpid()))
child = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
record = os.environ.get("STAND_IN_RECORD")
if record:
    Path(record).write_text(f"{{os.getpid()}} {{child.pid}}")
outputs = [a.split(":", 1)[1] for a in args if a.startswith("avformat:")]
for output in outputs:
    open(output, "wb").close()
for frame in range(1, int(os.environ.get("STAND_IN_FRAMES", "0")) + 1):
    sys.stderr.write(f"Current Frame: {{frame:10d}}, percentage: {{frame:10d}}\\n")
    sys.stderr.flush()
    time.sleep(0.05)
grow = float(os.environ.get("STAND_IN_GROW", "0"))
if grow:
    ends = time.monotonic() + grow
    while time.monotonic() < ends:
        with open(outputs[0], "ab") as handle:
            handle.write(b"x" * 1000)
        time.sleep(0.2)
    child.kill()
    sys.exit(0)
time.sleep(600)
"""


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    """The hung melt, named ``melt`` like the real one."""
    folder = tmp_path / "stand-in"
    folder.mkdir()
    path = folder / "melt"
    path.write_text(STAND_IN.format(python=sys.executable))
    path.chmod(0o755)
    return path


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def gone(pids: list[int], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def recorded(path: Path) -> list[int]:
    return [int(pid) for pid in path.read_text().split()]


def document(tmp_path: Path) -> Path:
    path = tmp_path / "doc.mlt"
    path.write_text("<mlt/>")
    return path


@pytest.mark.parametrize("printed", [3, 0])
def test_a_silent_melt_is_killed_and_named(stand_in: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           printed: int) -> None:
    record = tmp_path / "pids"
    monkeypatch.setenv(MELT_ENV, str(stand_in))
    monkeypatch.setenv(STALL_ENV, "2")
    monkeypatch.setenv("STAND_IN_RECORD", str(record))
    monkeypatch.setenv("STAND_IN_FRAMES", str(printed))
    reported: list[int] = []
    began = time.monotonic()
    with pytest.raises(RenderError) as caught:
        run_melt(document(tmp_path), ["-consumer", f"avformat:{tmp_path / 'out.mp4'}"], 100,
                 lambda frame, frames: reported.append(frame))
    took = time.monotonic() - began
    assert str(caught.value) == f"melt stopped responding for 2 s at frame {printed} of 100"
    assert 2 <= took < 2 + 5, took
    assert reported == list(range(1, printed + 1))
    # melt and the process it started are gone, not left behind.
    assert gone(recorded(record))


def test_a_melt_that_does_not_exit_after_its_last_frame(stand_in: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "pids"
    monkeypatch.setenv(MELT_ENV, str(stand_in))
    monkeypatch.setenv(STALL_ENV, "60")
    monkeypatch.setenv(EXIT_ENV, "1")
    monkeypatch.setenv("STAND_IN_RECORD", str(record))
    monkeypatch.setenv("STAND_IN_FRAMES", "5")
    began = time.monotonic()
    with pytest.raises(RenderError, match=r"^melt did not exit 1 s after its last frame "
                                          r"\(5 of 6\)$"):
        run_melt(document(tmp_path), ["-consumer", f"avformat:{tmp_path / 'out.mp4'}"], 6)
    assert time.monotonic() - began < 1 + 5
    assert gone(recorded(record))


def test_a_quiet_melt_whose_output_grows_is_left_alone(stand_in: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing the output (an encoder's flush, moving an MP4's index to its start) is
    progress too, though melt prints nothing meanwhile."""
    out = tmp_path / "out.mp4"
    monkeypatch.setenv(MELT_ENV, str(stand_in))
    monkeypatch.setenv(STALL_ENV, "1")
    monkeypatch.setenv("STAND_IN_FRAMES", "2")
    monkeypatch.setenv("STAND_IN_GROW", "3")
    run_melt(document(tmp_path), ["-consumer", f"avformat:{out}"], 100)
    assert out.stat().st_size >= 10_000


def test_watch_settings_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert melt_watch({}) == melt_watch({STALL_ENV: "", EXIT_ENV: " "})
    assert melt_watch({}).stall_s == 120 and melt_watch({}).exit_s == 15
    assert melt_watch({STALL_ENV: "30", EXIT_ENV: "2.5"}).exit_s == 2.5
    for bad in ("soon", "0", "-3", "nan", "inf"):
        with pytest.raises(RenderError, match=f"^{STALL_ENV} must be a number of seconds"):
            melt_watch({STALL_ENV: bad})
    monkeypatch.setenv(MELT_ENV, str(tmp_path / "no-melt"))
    with pytest.raises(RenderError, match=f"^{MELT_ENV}=.*no-melt: no such executable$"):
        run_melt(document(tmp_path), ["-consumer", f"avformat:{tmp_path / 'out.mp4'}"], 10)


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "melter.cli", *args], env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("existing", [None, b"a good earlier render"])
def test_render_reports_a_hung_melt_in_one_line(stand_in: Path, tmp_path: Path,
                                                existing: bytes | None) -> None:
    record = tmp_path / "pids"
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "meeting.mp4"
    if existing is not None:
        out.write_bytes(existing)
    env = {**os.environ, MELT_ENV: str(stand_in), STALL_ENV: "2",
           "STAND_IN_RECORD": str(record), "STAND_IN_FRAMES": "3"}
    done = run_cli("render", str(FIXTURE), "-o", str(out), env=env)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"melter: error: melt stopped responding for 2 s at frame 3 of {FIXTURE_FRAMES}"]
    # No partial file under the final name or beside it; an earlier output is untouched.
    if existing is None:
        assert sorted(folder.iterdir()) == []
    else:
        assert sorted(folder.iterdir()) == [out]
        assert out.read_bytes() == existing
    assert gone(recorded(record))


def test_the_audio_pass_renders_with_the_watch(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The farm's audio pass (the whole meeting's audio, no video), with the real melt."""
    monkeypatch.delenv(MELT_ENV, raising=False)
    monkeypatch.setenv(STALL_ENV, "30")
    monkeypatch.setenv(EXIT_ENV, "5")
    planned = plan_render(discover([FIXTURE]), load_layout("grid"))
    out = tmp_path / "audio.mp4"
    reported: list[int] = []
    result = render(planned, [(out, PRESETS["mp4"])], video=False, workdir=tmp_path / "media",
                    progress=lambda frame, frames: reported.append(frame))
    assert result.frames == FIXTURE_FRAMES and reported
    expected = round(FIXTURE_FRAMES * 48000 / 30)
    with av.open(str(out)) as container:
        assert not container.streams.video
        samples = sum(frame.samples for frame in container.decode(audio=0))
    # AAC adds its priming and pads its last frame: within two 1024-sample frames.
    assert math.isclose(samples, expected, abs_tol=2048), (samples, expected)


def test_the_farm_retries_a_unit_whose_melt_hung(stand_in: Path, tmp_path: Path) -> None:
    """The audio pass's melt hangs once, as melt 7.12 does; the unit fails with the reason
    and its retry renders the job."""
    melt = shutil.which("melt")
    assert melt is not None
    marker = tmp_path / "stalled-once"
    record = tmp_path / "pids"
    farm = FarmHarness(tmp_path / "farm", test_redis_url(), settings={
        MELT_ENV: str(stand_in), STALL_ENV: "2", "STAND_IN_STALL_ONCE": str(marker),
        "STAND_IN_MELT": melt, "STAND_IN_FRAMES": "0", "STAND_IN_RECORD": str(record)})
    try:
        worker = farm.start_worker("w1")
        job = farm.submit(farm.meeting("dev-three-party-vp8"), "retried.mp4", chunk_seconds=8)
        info = farm.wait(job, timeout=240)
        assert info["state"] == "done", info
        audio = [u for name, u in info["units"].items() if name.startswith("a")]
        assert [u["attempts"] for u in audio] == [2], info["units"]
        assert marker.exists()
        assert "melt stopped responding for 2 s at frame 0 of" in worker.text()
        assert gone(recorded(record))
        assert (farm.outputs / "retried.mp4").exists()
    finally:
        farm.cleanup()
