"""The MJR container: Janus's recording format (see :mod:`melter.mjr.reader`)."""

from melter.mjr.reader import MjrFrame, MjrHeader, MjrReader, Variant

__all__ = ["MjrFrame", "MjrHeader", "MjrReader", "Variant"]
