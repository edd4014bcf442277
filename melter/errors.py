"""Errors a user can act on.

Every error Melter raises for bad input names the file and, for MJR data, the byte offset,
so the command line can print one line and exit 1 instead of a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class MelterError(Exception):
    """Base of every error caused by input or configuration (exit code 1)."""


class InputError(MelterError):
    """A file that cannot be used, with where it went wrong."""

    def __init__(self, path: str | Path, message: str, offset: int | None = None) -> None:
        self.path = str(path)
        self.offset = offset
        self.reason = message
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{self.path}{where}: {message}")


class UnsupportedError(MelterError):
    """A valid input that Melter cannot turn into the requested output."""


def validation_problems(exc: ValidationError, top: str) -> str:
    """A pydantic error as one line: ``field.path: problem; ...`` (``top`` for the document
    itself), for messages that name the field to fix."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or top}: {e['msg']}"
                     for e in exc.errors())


#: ``scheme://user:password@`` in a URL (Redis, AMQP, HTTP callbacks), also as a path made of
#: one (``scheme:/user:password@``, its double slash collapsed).
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*:/{1,2}[^:/@\s]*:)[^@\s]+@")


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``: messages reach
    terminals, logs, job records and API callers, which must not learn the broker's password."""
    return _URL_PASSWORD.sub(r"\1***@", text)

