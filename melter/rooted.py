"""Files that must stay under a root folder: where a link really leads, whether a path may be
read at all (a FIFO would block a reader, a device never end), and reading and linking names
in a folder held as a descriptor, never through a link planted in it."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class NotRegularFile(OSError):
    """A name that is a FIFO, a device or a folder where a file was expected."""


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


def exists_at(fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def read_at(fd: int, name: str, limit: int) -> bytes:
    """At most ``limit`` bytes of the regular file ``name`` in the folder ``fd``, not
    following a link (:class:`NotRegularFile` for anything else)."""
    handle = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=fd)
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise NotRegularFile(f"{name} is not a regular file")
        return os.read(handle, limit)
    finally:
        os.close(handle)


def link_new(source: int, name: str, target: int, final: str) -> None:
    """``name`` in the folder ``source`` also as ``final`` in ``target``, in one step and never
    over an existing file (FileExistsError); neither name is looked up through a link. Where
    the file system has no hard links, the file is renamed into place instead (after checking
    the name is free), so ``name`` may be gone afterwards."""
    try:
        os.link(name, final, src_dir_fd=source, dst_dir_fd=target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EOPNOTSUPP):
            raise
        if exists_at(target, final):
            raise FileExistsError(errno.EEXIST, "exists", final) from None
        os.replace(name, final, src_dir_fd=source, dst_dir_fd=target)
