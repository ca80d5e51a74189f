"""Kept for old imports: the probe's figure is :func:`gradflow.plot.probe_overview`."""
from __future__ import annotations

from ..plot import probe_overview as probe_figure

__all__ = ["probe_figure"]
