"""Outputs as users meet them: the mode their umask gives, and a full disk said in words."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent.parent / "fixtures"
VIDEO = FIXTURES / "dev-three-party-vp8" / "videoroom-2001-user-501-1795700513534447-video-1.mjr"


def melter(*args: str | Path, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "melter.cli", *map(str, args)], capture_output=True, text=True,
        timeout=300, preexec_fn=lambda: os.umask(umask),
    )


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_outputs_take_the_users_umask(tmp_path: Path, umask: int, mode: int) -> None:
    converted = tmp_path / "v.webm"
    assert melter("convert", VIDEO, "-o", converted, umask=umask).returncode == 0
    rendered = tmp_path / "m.m4a"
    result = melter("render", FIXTURES / "dev-two-party-h264", "-o", rendered, umask=umask)
    assert result.returncode == 0, result.stderr
    for path in (converted, rendered):
        assert path.stat().st_mode & 0o777 == mode, (path.name, oct(path.stat().st_mode))


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 300 kB tmpfs: too small for any video of the fixtures."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "full"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("command", ["convert", "render"])
def test_a_full_disk_is_named_and_leaves_nothing(full_disk: Path, command: str) -> None:
    keep = full_disk / "keep.txt"
    keep.write_text("an earlier good file")
    out = full_disk / "out.webm"
    source = VIDEO if command == "convert" else FIXTURES / "dev-two-party-h264"
    result = melter(command, source, "-o", out)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"melter: error: no space left on device at {full_disk}"), lines
    assert sorted(p.name for p in full_disk.iterdir()) == ["keep.txt"]
    assert keep.read_text() == "an earlier good file"
