"""Layouts: where each participant goes on the canvas, and how that changes over time."""

from melter.layout.model import Layout, Region, load_layout

__all__ = ["Layout", "Region", "load_layout"]
