"""The processes below a process, from ``/proc`` (psutil where there is none): what must be
stopped with a melt or a farm attempt, since their children outlive a kill of the parent."""

from __future__ import annotations

import os
from pathlib import Path


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
