"""What a finished output is made of: ``<output>.manifest.json`` beside it.

It names the job and the attempt that wrote the file, the layout document, every input file
with its SHA-256, the versions of the tools (Melter, melt, FFmpeg, PyAV and its libraries), the
timings, and the output's own measurements and digest.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

import melter
from melter.convert import file_mode
from melter.rooted import file_problem


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_files(inputs: list[Path], root: Path | None = None) -> list[Path]:
    """The files of the inputs; with ``root``, only regular files whose real path lies under
    it (the manifest must not hash a link to elsewhere, nor read a FIFO or a device)."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files.extend(sorted(p for p in item.iterdir() if p.is_file()
                                and not p.name.startswith(".")))
        elif item.is_file():
            files.append(item)
    if root is not None:
        files = [p for p in files if file_problem(p, root) is None]
    return files


def describe_inputs(inputs: list[Path], root: Path | None = None) -> list[dict[str, Any]]:
    return [{"path": str(p), "bytes": p.stat().st_size, "sha256": sha256(p)}
            for p in input_files(inputs, root)]


def _first_line(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False,
                              env={**os.environ, "LC_ALL": "C.UTF-8"})
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0].strip() if text else None


@functools.cache
def tool_versions() -> dict[str, Any]:
    from melter.engine.mlt import melt_binary

    try:
        melt = _first_line([melt_binary(), "--version"])
    except Exception:
        melt = None
    versions: dict[str, Any] = {
        "melter": melter.__version__,
        "melt": melt,
        "ffmpeg": (_first_line(["ffmpeg", "-version"]) or "").split(" Copyright")[0] or None,
        "pyav": av.__version__,
        "libav": {name: ".".join(str(n) for n in version)
                  for name, version in av.library_versions.items()},
    }
    try:
        import celery

        versions["celery"] = celery.__version__
    except ImportError:
        pass
    return versions


def measure(path: Path) -> dict[str, Any]:
    """Streams, frame count (video packets), duration and digest of a media file."""
    info: dict[str, Any] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    with av.open(str(path)) as container:
        info["duration_s"] = round((container.duration or 0) / 1e6, 6)
        if container.streams.video:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            info["video"] = {
                "codec": stream.codec_context.name,
                "width": stream.codec_context.width,
                "height": stream.codec_context.height,
                "fps": float(rate) if isinstance(rate, Fraction) else None,
                "frames": sum(1 for packet in container.demux(stream) if packet.size),
            }
    with av.open(str(path)) as container:
        if container.streams.audio:
            audio = container.streams.audio[0]
            duration = (float(audio.duration * audio.time_base)
                        if audio.duration and audio.time_base else None)
            info["audio"] = {"codec": audio.codec_context.name,
                             "sample_rate": audio.codec_context.sample_rate,
                             "duration_s": duration}
    return info


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.chmod(temp, file_mode())
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(data, out, indent=2, sort_keys=False)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


#: A manifest's field marking the output as a meeting's live playlist (an HLS EVENT playlist
#: that grows while the meeting goes on): the meeting's render takes its name and replaces it.
LIVE = "live"
#: More than any manifest holds.
MANIFEST_LIMIT = 64 << 20


def is_live(manifest: bytes) -> bool:
    """Whether a manifest's text marks its output as a live playlist."""
    try:
        data = json.loads(manifest)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get(LIVE) is True


def is_live_output(path: Path) -> bool:
    """Whether ``path`` is a live playlist (by its manifest, read without following a link)."""
    side = path.with_name(path.name + ".manifest.json")
    try:
        handle = os.open(side, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(handle, "rb") as reader:
        return is_live(reader.read(MANIFEST_LIMIT))
