"""Types of the compiled passes (``melter/_fastpath.pyx``)."""

from collections.abc import Iterator
from typing import Any

CONSTANTS: dict[str, float]

class Fallback(Exception): ...

def first_pass(
    analysis: Any, facts: Any, piece_class: type, ext_level: int | None, ext_orient: int | None
) -> tuple[int, str] | None: ...
def timed_frames(analysis: Any, frame_class: type) -> Iterator[Any]: ...
