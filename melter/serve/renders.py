"""From "this meeting is over" to a farm job: which files, which layout, which outputs.

Both triggers (Janus events and the folder watcher) end here, so an automatic render is the
same job whichever noticed the meeting. The job's idempotency key names the meeting, so
submitting it again (after a restart between the decision and the submission) returns the first
job instead of rendering twice.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from melter.farm.job import Priority
from melter.meeting import VIDEOROOM
from melter.serve.config import Settings


@dataclass(frozen=True)
class Recording:
    path: Path
    room: str
    stamp: int  # µs, from the file name (Janus's clock, as its events')


def recordings(folder: Path, room: str | None = None) -> list[Recording]:
    """The VideoRoom MJR files in ``folder`` (of ``room``), oldest first."""
    out = []
    try:
        names = sorted(folder.iterdir())
    except OSError:
        return []
    for path in names:
        if path.suffix != ".mjr" or not path.is_file():
            continue
        match = VIDEOROOM.match(path.stem)
        if match is None or (room is not None and match["room"] != room):
            continue
        out.append(Recording(path, match["room"], int(match["stamp"])))
    return sorted(out, key=lambda r: (r.stamp, r.path.name))


def start_label(stamp_us: int) -> str:
    return dt.datetime.fromtimestamp(stamp_us / 1e6, tz=dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def auto_spec(settings: Settings, room: str, meeting: str, start_us: int,
              files: list[Path], trigger: str, extra: dict[str, Any] | None = None, *,
              prerendered: bool = False) -> dict[str, Any]:
    """The farm job rendering one meeting the way the configuration says for its room;
    ``prerendered``: a meeting the service prerenders while it goes on (Janus's events)."""
    rule = settings.service.rule(room)
    names = {"room": room, "start": start_label(start_us), "meeting": meeting}
    outputs = []
    for output in rule.outputs:
        try:
            name = output.name.format(**names)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"output name {output.name!r}: unknown field {exc}; use {{room}}, "
                             "{start} or {meeting}") from None
        outputs.append({"path": str(settings.renders / name), "preset": output.preset})
    # A meeting prerendered while it goes on is cut finely (its prerenders' chunks are kept
    # by key, so the render after it must cut it the same way).
    service = settings.service
    chunks = service.chunk_seconds if prerendered and service.prerender_seconds > 0 else 0
    return {
        "inputs": [str(p) for p in files],
        **({"chunk_seconds": chunks} if chunks > 0 else {}),
        "layout": rule.layout,
        "outputs": outputs,
        "priority": Priority.AUTO,
        "callback_url": rule.callback_url,
        "idempotency_key": f"auto:{trigger}:{meeting}",
        "metadata": {"room": room, "meeting": meeting, "trigger": trigger, **(extra or {})},
        "room": room,
    }
