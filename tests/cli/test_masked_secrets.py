"""Passwords in URLs never reach a message: the CLI's error line and a job's stored error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from melter.errors import mask_secrets

FIXTURES = Path(__file__).parent.parent / "fixtures"


@pytest.mark.parametrize(("text", "masked"), [
    ("no redis://:s3cret@redis:6379/0.", "no redis://:***@redis:6379/0."),
    ("amqp://guest:gu3st@rabbit:5672// down", "amqp://guest:***@rabbit:5672// down"),
    ("rediss://melter:a:b@c@host/1", "rediss://melter:***@c@host/1"),
    ("redis:/:s3cret@host:6379/0: no such layout", "redis:/:***@host:6379/0: no such layout"),
    ("http://hooks.example/x?t=1 redis://host:6379", "http://hooks.example/x?t=1 redis://host:6379"),
])
def test_url_passwords_are_masked(text: str, masked: str) -> None:
    assert mask_secrets(text) == masked


def test_the_cli_error_line_masks_a_broker_password() -> None:
    """A broker URL given where a layout goes (a pasting slip) is no file: the one-line error
    quotes the name, masked."""
    result = subprocess.run(
        [sys.executable, "-m", "melter.cli", "plan", str(FIXTURES / "dev-two-party-h264"),
         "--layout", "redis://:s3cretPW@10.0.0.5:6379/0"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "s3cretPW" not in result.stderr, result.stderr
    assert ":***@10.0.0.5" in result.stderr, result.stderr
