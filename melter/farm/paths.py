"""Keeping a job inside the storage root: every file it reads, every folder it writes.

A job names its inputs, layouts and outputs, but the files it ends up touching are more than
those names: the recordings found in an input folder, the layouts its rules name, the folders
an output is written through. Any of them can be a symbolic link, a device or a FIFO, or can be
swapped for one between submission and the moment a worker gets to it. So the same checks run
twice, when the job is submitted (a clear refusal before anything is queued) and again on the
worker (the files may have changed since):

* a file is used only when its real path lies under the root and it is a regular file;
* layout files are read through a descriptor opened without following a final symbolic link,
  checked to be a regular file, and read up to :data:`LAYOUT_LIMIT` bytes;
* layout names are built-ins or files under the root, never names relative to the current
  folder of whichever process happens to read them;
* output folders are opened one component at a time with ``O_NOFOLLOW`` from the root, and
  files are created and renamed relative to those descriptors, so a folder replaced by a link
  after the check is refused instead of written through.

Refusals are one line naming the path and what is wrong with it, never the content of the
file: a layout that is not YAML says where, not what it saw there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from melter import rooted
from melter.farm.job import JobError
from melter.rooted import file_problem, real_under

#: Layout files are small documents; a bigger one is a mistake or a trap (``/dev/zero``).
LAYOUT_LIMIT = 1 << 20
#: Files in a meeting folder the renderer reads besides the recordings.
MEETING_FILES = ("meeting.yaml", "meeting.yml", "events.jsonl")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def meeting_files(folder: Path) -> list[Path]:
    """What the renderer and the manifest read of an input folder: its recordings and its
    meeting files (every visible entry, as the manifest hashes them all)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise JobError(f"input {folder}: {exc.strerror or exc}") from None
    return [p for p in entries if not p.name.startswith(".")]


def check_inputs(inputs: list[Path], root: Path) -> None:
    """Refuse a job whose input folders hold anything that escapes the root or is not a
    regular file (at submit: the caller learns before anything is queued)."""
    for item in inputs:
        files = meeting_files(item) if item.is_dir() else [item]
        for path in files:
            if path.is_dir() and not path.is_symlink():
                continue  # sub-folders are not read
            problem = file_problem(path, root)
            if problem is not None:
                raise JobError(f"input {path}: {problem}; the farm only reads regular files "
                               "under the storage root (MELTER_STORAGE_ROOT)")


def read_capped(path: Path, root: Path, what: str, limit: int = LAYOUT_LIMIT) -> bytes:
    """The bytes of a small regular file under ``root``: its real path checked, opened
    without following a final link and without blocking (a FIFO), at most ``limit`` bytes."""
    resolved = real_under(path, root)
    if resolved is None:
        raise JobError(f"{what} {path} is outside the storage root (MELTER_STORAGE_ROOT); the "
                       "farm only reads files under it")
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise JobError(f"{what} {path}: {exc.strerror or 'cannot be read'}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise JobError(f"{what} {path}: not a regular file")
        if info.st_size > limit:
            raise JobError(f"{what} {path}: {info.st_size} bytes, more than the "
                           f"{limit} allowed")
        chunks = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise JobError(f"{what} {path}: more than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def yaml_document(data: bytes, what: str, path: Path | str) -> Any:
    """A YAML document; its errors say where (line, column), not what was there."""
    try:
        return yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise JobError(f"{what} {path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise JobError(f"{what} {path}: not valid YAML{where}") from None


# -- layouts -----------------------------------------------------------------------------------
def _builtin_text(name: str) -> str | None:
    """A built-in layout's document by bare name (None when there is none by that name)."""
    from melter.layout.model import builtin_dir

    if "/" in name or "\\" in name or name.startswith(".") or name.endswith((".yaml", ".yml")):
        return None
    candidate = builtin_dir() / f"{name}.yaml"
    if not candidate.is_file():
        return None
    return candidate.read_text(encoding="utf-8")


def _builtin_names() -> str:
    from melter.layout.model import builtin_names

    return ", ".join(builtin_names())


def layout_file(value: str, root: Path, base: Path | None, what: str) -> dict[str, Any]:
    """A layout file's document: ``value`` absolute, or relative to ``base`` (the folder of the
    layout naming it) or else to ``root``; under ``root``, regular, at most 1 MB."""
    path = Path(value)
    if not path.is_absolute():
        path = (base or Path(os.path.realpath(root))) / path
    data = yaml_document(read_capped(path, root, what), what, value)
    if not isinstance(data, dict):
        raise JobError(f"{what} {value}: not a layout document")
    return data


def _check_document(data: dict[str, Any], source: str) -> Any:
    from melter.layout.model import parse_layout

    return parse_layout(data, source)


def resolve_layout(value: str | dict[str, Any], root: Path,
                   known: dict[str, dict[str, Any]] | None = None,
                   ) -> tuple[str | dict[str, Any], dict[str, dict[str, Any]]]:
    """A job's layout and the layouts its rules name, read once and checked.

    Returns the layout as the job keeps it (a built-in's name, or a document: a file's content
    is inlined so workers never read it again) and ``{rule layout name: document}``. A name
    without a path separator or YAML suffix is a built-in only; anything else is a file under
    the root. Rule layouts are looked up the same way, relative paths from the naming file's
    folder (or the root for an inline layout); the background image must be a regular file
    under the root too (melt reads it by name). ``known``: rule layouts resolved for an
    earlier job of the same document (a re-render), used as they were."""
    base: Path | None = None
    source = "job layout"
    if isinstance(value, dict):
        document: dict[str, Any] = value
        kept: str | dict[str, Any] = value
    elif "/" not in value and not value.endswith((".yaml", ".yml")):
        text = _builtin_text(value)
        if text is None:
            raise JobError(f"layout {value}: no such built-in layout (built-ins: "
                           f"{_builtin_names()}; or give a YAML file under the storage root)")
        document = yaml.safe_load(text)
        kept = value
        source = f"built-in layout {value}"
    else:
        path = Path(value) if Path(value).is_absolute() else Path(os.path.realpath(root)) / value
        document = layout_file(value, root, None, "layout")
        base = Path(os.path.realpath(path)).parent
        kept = document
        source = f"layout {value}"
    layout = _check_document(document, source)
    image = layout.canvas.background_image
    if image and not isinstance(kept, str):
        # melt reads the image by name from wherever it runs: the name kept is its real path.
        found = _under(Path(image), base, root)
        problem = file_problem(found, root)
        if problem is not None:
            raise JobError(f"layout canvas.background_image {image}: {problem}")
        kept = {**kept, "canvas": {**kept.get("canvas", {}),
                                   "background_image": os.path.realpath(found)}}
    rules: dict[str, dict[str, Any]] = {}
    for number, rule in enumerate(layout.rules):
        name = rule.layout
        if name is None or name in rules:
            continue
        what = f"rules.{number}.layout"
        text = _builtin_text(name)
        if known and name in known:
            rules[name] = known[name]
        elif text is not None:
            rules[name] = yaml.safe_load(text)
        elif "/" not in name and not name.endswith((".yaml", ".yml")):
            raise JobError(f"{what}: no built-in layout named {name!r} (built-ins: "
                           f"{_builtin_names()}; or name a YAML file under the storage root)")
        else:
            rules[name] = layout_file(name, root, base, what)
        _check_document(rules[name], f"{what} {name}")
    return kept, rules


def _under(path: Path, base: Path | None, root: Path) -> Path:
    return path if path.is_absolute() else (base or Path(os.path.realpath(root))) / path


def layouts_for(value: str | dict[str, Any], stored: str | None, root: Path) -> tuple[Any, Any]:
    """On the worker: the job's :class:`~melter.layout.model.Layout` and its rule layouts, from
    the documents resolved at submit (``stored``, JSON) or, for a job submitted before they
    were kept, resolved again under the same checks."""
    import json

    if stored:
        rules_docs: dict[str, dict[str, Any]] = json.loads(stored)
        kept = value
        if isinstance(value, str) and _builtin_text(value) is None:
            kept, _ = resolve_layout(value, root)
    else:
        kept, rules_docs = resolve_layout(value, root)
    if isinstance(kept, str):
        text = _builtin_text(kept)
        assert text is not None  # resolve_layout refused any other name
        layout = _check_document(yaml.safe_load(text), f"built-in layout {kept}")
    else:
        layout = _check_document(kept, "job layout")
        image = layout.canvas.background_image
        if image:
            problem = file_problem(_under(Path(image), None, root), root)
            if problem is not None:
                raise JobError(f"layout canvas.background_image {image}: {problem}")
    rules = {name: _check_document(doc, f"rule layout {name}") for name, doc in rules_docs.items()}
    return layout, rules


# -- output folders ----------------------------------------------------------------------------
def open_folder(root: Path, folder: Path, create: bool = False) -> int:
    """A descriptor of ``folder``, reached from ``root`` one component at a time without
    following any link (missing components are made when ``create``). Refused (JobError) when
    ``folder`` is not under ``root`` or any component is a link or not a folder: whatever is
    then created through the descriptor lands in the folder that was checked."""
    base = Path(os.path.realpath(root))
    try:
        parts = folder.relative_to(base).parts
    except ValueError:
        raise JobError(f"output folder {folder} is outside the output root {base}") from None
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            if part in ("..", "."):
                raise JobError(f"output folder {folder}: {part!r} in the path")
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o777, dir_fd=fd)
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                reason = ("a symbolic link or not a folder"
                          if exc.errno in (errno.ELOOP, errno.ENOTDIR)
                          else exc.strerror or "cannot be opened")
                raise JobError(f"output folder {folder}: {part} is {reason}; the farm only "
                               "writes into real folders under the output root") from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def folder_fd(root: Path, folder: Path, create: bool = False) -> Iterator[int]:
    fd = open_folder(root, folder, create)
    try:
        yield fd
    finally:
        os.close(fd)


def read_at(fd: int, name: str, limit: int = LAYOUT_LIMIT) -> bytes:
    """A small regular file in the folder ``fd`` (a manifest), not following a link."""
    return rooted.read_at(fd, name, limit)


def write_at(fd: int, name: str, data: bytes, mode: int) -> None:
    """Write ``name`` in the folder ``fd`` whole or not at all: a fresh private temporary
    (``O_EXCL | O_NOFOLLOW``, so no planted link is written through), then a rename."""
    temp = f".{name}.{secrets.token_hex(4)}.part"
    handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=fd)
    try:
        try:
            os.fchmod(handle, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(handle, view):]
            os.fsync(handle)
        finally:
            os.close(handle)
        os.replace(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=fd)
        raise


def same_place(path: Path) -> bool:
    """Whether ``path`` (a real path recorded at submit) still is one: no component has been
    replaced by a link since (cleanup must not delete through a swapped folder)."""
    return os.path.realpath(path) == str(path)
