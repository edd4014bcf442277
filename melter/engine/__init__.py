"""Render engines: scene plans as documents for a renderer, and running it (MLT's melt)."""
