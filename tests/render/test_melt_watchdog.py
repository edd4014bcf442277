"""A melt that stops responding is killed and reported; it never hangs its caller.

melt 7.12 can hang for good before its first frame (its avformat consumer's thread can end
before the consumer is marked running: the output is closed empty and melt waits forever).
That hang is recognised within seconds and melt started again; the real melt is made to hang
so by an LD_PRELOAD library (``tests/helpers/melt_slowstart.c``, built with gcc) that holds up
the thread starting the consumer's. Any other hang waits for the stall limit: the hung melt
there is a stand-in executable chosen through ``MELTER_MELT``, which prints melt's
``-progress2`` lines, starts a child process and sleeps with its output open (so it is not
taken for the start race). Everything else is the real melt.
"""

from __future__ import annotations

import logging
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
from melter.render import PRESETS, RenderPlan, plan_render, render
from tests.helpers.farm import FarmHarness, alive, test_redis_url

FIXTURE = Path(__file__).parent.parent / "fixtures" / "dev-three-party-vp8"
SLOWSTART = Path(__file__).parent.parent / "helpers" / "melt_slowstart.c"
RACE = "melt hung before its first frame 3 times (MLT consumer start race)"
#: Frames of the fixture's render at 30 fps.
FIXTURE_FRAMES = 719

STAND_IN = """#!{python}
import os, subprocess, sys, time
from pathlib import Path

args = sys.argv[1:]
load = float(os.environ.get("STAND_IN_LOAD", "0"))
if load:
    ends = time.monotonic() + load
    while time.monotonic() < ends:
        pass
    real = os.environ["STAND_IN_MELT"]
    os.execv(real, [real, *args])
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
held = [open(output, "wb") for output in outputs]
for frame in range(1, int(os.environ.get("STAND_IN_FRAMES", "0")) + 1):
    sys.stderr.write(f"Current Frame: {{frame:10d}}, percentage: {{frame:10d}}\\n")
    sys.stderr.flush()
    time.sleep(0.05)
grow = float(os.environ.get("STAND_IN_GROW", "0"))
if grow:
    ends = time.monotonic() + grow
    while time.monotonic() < ends:
        held[0].write(b"x" * 1000)
        held[0].flush()
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
    """The first audio unit's melt hangs once (not in the start race, which is restarted in
    the unit); the unit fails with the reason and its retry renders the job."""
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
        assert [u["attempts"] for u in audio] == [2] + [1] * (len(audio) - 1), info["units"]
        assert len(audio) >= 2
        assert marker.exists()
        assert "melt stopped responding for 2 s at frame 0 of" in worker.text()
        assert gone(recorded(record))
        assert (farm.outputs / "retried.mp4").exists()
    finally:
        farm.cleanup()


def restarts(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "melter.engine.mlt" and record.levelno == logging.WARNING]


def restart(n: int) -> str:
    return (f"melt hung before its first frame (MLT consumer start race); started it again "
            f"(restart {n} of 2)")


def melts_below(pid: int) -> list[int]:
    """The melt processes under ``pid`` (other people's melts are not this test's)."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
            names[int(entry)] = stat[stat.find("(") + 1:stat.rfind(")")]
    found = []
    for child, name in names.items():
        ancestor = parents.get(child)
        while ancestor is not None and ancestor != pid:
            ancestor = parents.get(ancestor)
        if ancestor == pid and name == "melt":
            found.append(child)
    return found


@pytest.fixture(scope="module")
def slowstart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LD_PRELOAD library that makes the real melt hang in its consumer start race."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot build tests/helpers/melt_slowstart.c, "
                    "which makes melt hang in its consumer start race")
    library = tmp_path_factory.mktemp("slowstart") / "melt_slowstart.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(library), str(SLOWSTART),
                    "-ldl"], check=True, capture_output=True, text=True)
    return library


@pytest.fixture
def planned() -> RenderPlan:
    return plan_render(discover([FIXTURE]), load_layout("grid"))


@pytest.mark.parametrize("video", [False, True], ids=["audio", "video"])
def test_a_melt_caught_in_the_start_race_is_restarted(
        slowstart: Path, planned: RenderPlan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, video: bool) -> None:
    """The first melt hangs as melt 7.12 does on a busy machine; the render is done by the
    second, a few seconds later, with a warning. (melt can also hang so by itself, which
    then adds a second restart.)"""
    monkeypatch.delenv(MELT_ENV, raising=False)
    media = tmp_path / "media"
    began = time.monotonic()
    render(planned, [(tmp_path / "normal.mp4", PRESETS["mp4"])], video=video, workdir=media)
    normal = time.monotonic() - began
    marker = tmp_path / "held-up"
    monkeypatch.setenv("LD_PRELOAD", str(slowstart))
    monkeypatch.setenv("MELT_SLOWSTART_ONCE", str(marker))
    folder = tmp_path / "out"
    out = folder / "meeting.mp4"
    caplog.clear()
    began, clock = time.monotonic(), time.time()
    result = render(planned, [(out, PRESETS["mp4"])], video=video, workdir=media)
    took = time.monotonic() - began
    # Time lost to the hung melt: until it was started again (the load of other people's
    # tests makes two renders' times too far apart to compare).
    lost = next((record.created - clock for record in caplog.records
                 if record.name == "melter.engine.mlt"), math.inf)
    print(f"\n{'video' if video else 'audio'}: a render {normal:.1f} s; with melt hung once "
          f"{took:.1f} s, of which {lost:.1f} s until the restart; "
          f"{len(restarts(caplog))} restart(s)")
    assert marker.exists()
    assert restarts(caplog)[:1] == [restart(1)]
    assert restarts(caplog) in ([restart(1)], [restart(1), restart(2)])
    assert lost < 10, lost
    assert result.frames == FIXTURE_FRAMES
    assert sorted(folder.iterdir()) == [out]
    with av.open(str(out)) as container:
        audio = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(audio))
        if video:
            assert container.streams.video[0].frames == FIXTURE_FRAMES
        else:
            assert not container.streams.video
    # AAC adds its priming and pads its last frame: within two 1024-sample frames.
    assert math.isclose(samples, round(FIXTURE_FRAMES * 48000 / 30), abs_tol=2048), samples
    assert melts_below(os.getpid()) == []


def test_a_melt_that_always_hangs_in_the_start_race_fails_in_one_line(
        slowstart: Path, planned: RenderPlan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(MELT_ENV, raising=False)
    monkeypatch.delenv("MELT_SLOWSTART_ONCE", raising=False)
    media = tmp_path / "media"
    began = time.monotonic()
    render(planned, [(tmp_path / "normal.mp4", PRESETS["mp4"])], video=False, workdir=media)
    normal = time.monotonic() - began
    monkeypatch.setenv("LD_PRELOAD", str(slowstart))
    folder = tmp_path / "out"
    folder.mkdir()
    caplog.clear()
    began = time.monotonic()
    with pytest.raises(RenderError) as caught:
        render(planned, [(folder / "meeting.mp4", PRESETS["mp4"])], video=False,
               workdir=media)
    took = time.monotonic() - began
    print(f"\naudio: a render {normal:.1f} s, failing after 3 hung melts {took:.1f} s")
    assert str(caught.value) == RACE
    assert restarts(caplog) == [restart(1), restart(2)]
    assert took < 20, took
    assert sorted(folder.iterdir()) == []
    assert melts_below(os.getpid()) == []


def test_the_command_line_reports_the_start_race(slowstart: Path, tmp_path: Path) -> None:
    """Each restart is a line on stderr, then the failure's one line."""
    folder = tmp_path / "out"
    folder.mkdir()
    env = {key: value for key, value in os.environ.items() if key != MELT_ENV}
    env.update(LD_PRELOAD=str(slowstart))
    began = time.monotonic()
    done = run_cli("render", str(FIXTURE), "-o", str(folder / "meeting.mp4"), env=env)
    print(f"\ncommand line failing after 3 hung melts: {time.monotonic() - began:.1f} s")
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"warning: {restart(1)}", f"warning: {restart(2)}",
                     f"melter: error: {RACE}"], done.stderr
    assert sorted(folder.iterdir()) == []


def test_a_melt_busy_before_its_first_frame_is_not_restarted(
        stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A melt loading a large document also has one thread, no frame and an output nobody
    has opened yet (``atomic_output`` creates it empty); it is working, though, and is left
    to finish. The stand-in spends 5 s of CPU, then becomes the real melt."""
    melt = shutil.which("melt")
    assert melt is not None
    doc = tmp_path / "audio.mlt"
    frames = 90
    doc.write_text(f'<mlt><producer id="tone" out="{frames - 1}"><property name="mlt_service">'
                   f'tone</property></producer></mlt>')
    out = tmp_path / "out.mp4"
    out.touch()
    monkeypatch.setenv(MELT_ENV, str(stand_in))
    monkeypatch.setenv("STAND_IN_MELT", melt)
    monkeypatch.setenv("STAND_IN_LOAD", "5")
    began = time.monotonic()
    run_melt(doc, ["-consumer", f"avformat:{out}", "real_time=-1", "f=mp4", "acodec=aac",
                   "vn=1"], frames)
    took = time.monotonic() - began
    print(f"\na melt busy 5 s before its first frame: {took:.1f} s")
    assert restarts(caplog) == []
    assert took >= 5
    with av.open(str(out)) as container:
        assert container.streams.audio and container.duration
