"""How long a meeting Melter takes on: ``MELTER_MAX_MEETING_HOURS`` (default 12).

A recording's times come from its bytes; a damaged or hostile file can claim to span weeks, and
rendering that would fill a disk and hold a worker for days. Anything longer than the limit is
refused with the span it claims, before any output is written.
"""

from __future__ import annotations

import os
from pathlib import Path

from melter.errors import InputError, MelterError

MAX_MEETING_HOURS_ENV = "MELTER_MAX_MEETING_HOURS"
DEFAULT_MAX_MEETING_HOURS = 12.0


def max_meeting_hours() -> float:
    """The limit in hours, from the environment."""
    text = os.environ.get(MAX_MEETING_HOURS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_MEETING_HOURS
    try:
        hours = float(text)
    except ValueError:
        hours = 0.0
    if not 0 < hours < 10_000:
        raise MelterError(f"{MAX_MEETING_HOURS_ENV}={text!r}: not a number of hours above 0")
    return hours


def _over(start_us: int, end_us: int) -> str | None:
    limit = max_meeting_hours()
    hours = (end_us - start_us) / 3.6e9
    if hours <= limit:
        return None
    return f"spans {hours:.1f} h, over the {limit:g} h limit ({MAX_MEETING_HOURS_ENV})"


def check_recording_span(path: Path, start_us: int, end_us: int) -> None:
    """Refuse a recording longer than the limit (:class:`InputError` naming it)."""
    problem = _over(start_us, end_us)
    if problem:
        raise InputError(path, problem)


def check_meeting_span(start_us: int, end_us: int) -> None:
    """Refuse a meeting longer than the limit."""
    problem = _over(start_us, end_us)
    if problem:
        raise MelterError(f"the meeting {problem}")
