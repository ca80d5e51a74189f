"""The probe's figure: gradient and activation norms per unit across depth (paper style).

Left: ||dE/dx_l|| / ||dE/dx_L|| per unit on a log axis, the total (solid), the
direct term (dashed) and its prediction from eq. (5)/(8) (dotted). Right: the
activation norm ||x_l|| per unit (log axis). One colour per probed network.
Takes records, returns a Figure; the CLI writes it.
"""
from __future__ import annotations

from typing import Mapping, Union

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .report import per_unit

Tables = Union[pd.DataFrame, Mapping[str, pd.DataFrame]]


def probe_figure(tables: Tables, title: str | None = None) -> Figure:
    """Figure of one units table or of several (label -> table), drawn on the same axes."""
    if isinstance(tables, pd.DataFrame):
        tables = {"": tables}
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_g, ax_x = fig.subplots(1, 2)
    colours = _colours(len(tables))
    for (label, units), colour in zip(tables.items(), colours):
        df = per_unit(units)
        u = df["unit"].to_numpy()
        _line(ax_g, u, df.get("grad_ratio"), colour, "-", label or "total")
        _line(ax_g, u, df.get("direct_ratio"), colour, "--", None)
        _line(ax_g, u, df.get("pred_direct_ratio"), colour, ":", None, lw=2.2, alpha=0.8)
        _line(ax_x, u, df.get("x_norm"), colour, "-", label or "||x_l||")
    if len(tables) == 1:
        _stage_lines(ax_g, per_unit(next(iter(tables.values()))))
        _stage_lines(ax_x, per_unit(next(iter(tables.values()))))
    ax_g.set(yscale="log", xlabel="unit l (input -> output)", ylabel="||dE/dx_l|| / ||dE/dx_L||",
             title="gradient across depth")
    ax_x.set(yscale="log", xlabel="unit l (input -> output)", ylabel="||x_l|| (per sample, batch mean)",
             title="activations across depth")
    styles = [Line2D([], [], color="0.3", ls=ls, label=lab) for ls, lab in
              (("-", "total"), ("--", "direct term"), (":", "prediction, eq. (5)/(8)"))]
    ax_g.legend(handles=styles, fontsize=8, loc="best")
    if len(tables) > 1:
        handles = [Line2D([], [], color=c, label=lab) for lab, c in zip(tables, colours)]
        fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    for ax in (ax_g, ax_x):
        ax.grid(True, which="major", alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def _line(ax, u: np.ndarray, y, colour, ls: str, label, lw: float = 1.4, alpha: float = 1.0) -> None:
    if y is None:
        return
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(y) & (y > 0)   # log axis: zeros (a plain net's direct term) are not drawn
    if ok.any():
        ax.plot(u[ok], y[ok], ls=ls, color=colour, lw=lw, alpha=alpha, label=label)


def _stage_lines(ax, df: pd.DataFrame) -> None:
    starts = df.groupby("stage")["unit"].min().to_numpy()[1:]
    for s in starts:
        ax.axvline(s - 0.5, color="0.6", lw=0.8, ls="-", zorder=0)


def _colours(n: int) -> list:
    import matplotlib as mpl
    cmap = mpl.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
