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

from melter.proctree import descendants


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


def kill_children(pid: int | None = None) -> int:
    """SIGKILL every process below ``pid`` (default: this one); how many were signalled."""
    count = REGISTRY.kill_all() if pid is None else 0
    for child in reversed(descendants(pid)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)
            count += 1
    return count
