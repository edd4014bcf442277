"""The child processes an attempt starts (melt, ffmpeg), so they can be stopped at once.

melt is started by :func:`melter.engine.mlt.run_melt`, which keeps its ``Popen`` to itself;
what the farm can rely on is that a pool process runs one task at a time, so every process
below it belongs to the running attempt. :func:`kill_children` finds them through ``/proc``
(psutil when there is no ``/proc``) and kills them; processes the farm starts itself are also
kept in :data:`REGISTRY`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from pathlib import Path


class Registry:
    """Popen objects started by the farm in this process (ffmpeg for joins)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()

    def add(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._procs.add(process)

    def discard(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(process)

    def kill_all(self) -> int:
        with self._lock:
            procs = list(self._procs)
        for process in procs:
            with contextlib.suppress(OSError):
                process.kill()
        return len(procs)


REGISTRY = Registry()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def descendants(pid: int | None = None) -> list[int]:
    """Every process below ``pid`` (default: this one), nearest first."""
    root = os.getpid() if pid is None else pid
    if not Path("/proc/self").exists():
        try:
            import psutil
        except ImportError:
            return []
        try:
            return [p.pid for p in psutil.Process(root).children(recursive=True)]
        except psutil.Error:
            return []
    tree = _children_map()
    out: list[int] = []
    todo = list(tree.get(root, []))
    while todo:
        child = todo.pop(0)
        out.append(child)
        todo.extend(tree.get(child, []))
    return out


def kill_children(pid: int | None = None) -> int:
    """SIGKILL every process below ``pid`` (default: this one); how many were signalled."""
    count = REGISTRY.kill_all() if pid is None else 0
    for child in reversed(descendants(pid)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)
            count += 1
    return count
