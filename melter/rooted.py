"""Files that must stay under a root folder: where a link really leads, and whether a path may
be read at all (a FIFO would block a reader, a device never end)."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def real_under(path: Path, root: Path) -> Path | None:
    """``path``'s real location when it lies under ``root`` (itself resolved), else None."""
    base = Path(os.path.realpath(root))
    resolved = Path(os.path.realpath(path))
    if resolved == base or not resolved.is_relative_to(base):
        return None
    return resolved


def file_problem(path: Path, root: Path) -> str | None:
    """Why ``path`` may not be read as a job's file (None: it may): outside the root once links
    are followed, missing, or not a regular file (a FIFO would block, a device never end)."""
    if real_under(path, root) is None:
        return "links outside the storage root" if path.is_symlink() or \
            Path(os.path.realpath(path)) != path.absolute() else "is outside the storage root"
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return exc.strerror or "cannot be read"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    return None
