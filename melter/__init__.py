"""Melter: turn Janus WebRTC recordings (MJR files) into finished meeting videos."""

__version__ = "0.1.0"
