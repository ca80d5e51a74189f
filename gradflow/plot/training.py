"""Figures over training: the paper's training curves (Fig. 1, 3, 6) and gradient flow across training."""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from gradflow.errors import GradflowError
from gradflow.theory import decay_rate

from gradflow.plot.style import (COLOURS, PANEL_H, PANEL_W, axes_title, fig_title, panel_grid,
                                 positive_values, styled, subplots, unit_rows)


# --- training curves (paper Fig. 1, 3, 6) --------------------------------------------------

def _as_log(log) -> pd.DataFrame:
    """A long log table with a ``run`` column, from a table, a dict of tables or Run objects."""
    if isinstance(log, pd.DataFrame):
        return log if "run" in log else log.assign(run="")
    if isinstance(log, Mapping):
        return pd.concat([t.assign(run=str(k)) for k, t in log.items()], ignore_index=True)
    tables = [r.log.assign(run=r.label) for r in log]  # gradflow.runs.read.Run objects
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["run"])


def _curves(ax, log: pd.DataFrame, runs: Sequence[str], colours: Mapping[str, str],
            percent: bool = True) -> object:
    """Training loss dashed on ``ax``, test error solid on a twin right axis; returns the twin."""
    right = ax.twinx()
    for run in runs:
        sub = log[log["run"] == run].sort_values("iteration")
        c = colours[run]
        if "train_loss" in sub:
            tl = sub.dropna(subset=["train_loss"])
            ax.plot(tl["iteration"], tl["train_loss"], color=c, ls="--", lw=1.0,
                    label=f"{run}: training loss")
        if "test_error" in sub:
            te = sub.dropna(subset=["test_error"])
            right.plot(te["iteration"], te["test_error"] * (100 if percent else 1), color=c, lw=1.6,
                       label=f"{run}: test error")
    ax.set_xlabel("iterations")
    ax.set_ylabel("training loss (dashed)")
    right.set_ylabel("test error %  (solid)" if percent else "test error (solid)")
    right.grid(False)
    return right


def _curve_legend(fig: Figure, runs: Sequence[str], colours: Mapping[str, str]) -> None:
    handles = [Line2D([], [], color=colours[r], lw=2, label=r) for r in runs]
    handles += [Line2D([], [], color="0.3", ls="--", lw=1, label="training loss"),
                Line2D([], [], color="0.3", lw=1.6, label="test error")]
    col_w = 0.6 + 0.07 * max(len(h.get_label()) for h in handles)
    fits = max(1, int(fig.get_figwidth() // col_w))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles), fits))


def _palette(runs: Sequence[str]) -> dict[str, str]:
    import seaborn as sns
    return dict(zip(runs, sns.color_palette("colorblind", max(len(runs), 1)).as_hex()))


@styled
def training_curves(log, title: Optional[str] = None, percent: bool = True) -> Figure:
    """Paper Fig. 1 / 6: training loss (dashed, left axis) and test error (solid, right axis) vs iterations.

    ``log``: a long table with ``run``, ``iteration``, ``train_loss``,
    ``test_error`` (a fraction; plotted in % unless ``percent=False``), a dict
    ``{label: log}``, or :class:`gradflow.runs.read.Run` objects. One colour per run.

    Args:
        log: the runs' logs, in one of the forms above.
        title: the figure's title.
        percent: test error in % (else as a fraction).
    Returns:
        A matplotlib Figure.
    """
    log = _as_log(log)
    runs = list(pd.unique(log["run"]))
    colours = _palette(runs)
    fig, ax = subplots(figsize=(PANEL_W * 1.6, PANEL_H * 1.3))
    _curves(ax, log, runs, colours, percent)
    _curve_legend(fig, runs, colours)
    axes_title(ax, title or "Training loss (dashed) and test error (solid)", fig)
    return fig


@styled
def training_curve_panels(log, panels: Optional[Mapping[str, Sequence[str]]] = None,
                          baseline: Optional[str] = None, ncols: Optional[int] = None,
                          title: Optional[str] = None, percent: bool = True) -> Figure:
    """Paper Fig. 3: one panel per shortcut variant, each beside a baseline run.

    ``panels``: ``{panel title: [run labels]}``. Default: one panel per run,
    with ``baseline`` (a run label, e.g. the identity-shortcut net) drawn in
    every panel. Colours are per run and the same in every panel.
    """
    log = _as_log(log)
    runs = list(pd.unique(log["run"]))
    if baseline is not None and baseline not in runs:
        raise GradflowError(f"baseline {baseline!r} is not one of the runs {runs}")
    if panels is None:
        panels = {r: ([baseline] if baseline else []) + [r] for r in runs if r != baseline}
    colours = _palette(runs)
    fig, axes = panel_grid(len(panels), ncols or min(len(panels), 2), w=PANEL_W * 1.3, h=PANEL_H * 1.1)
    for ax, (name, members) in zip(axes, panels.items()):
        _curves(ax, log, members, colours, percent)
        ax.set_title(name, fontsize="medium")
    _curve_legend(fig, runs, colours)
    fig_title(fig, title or "Training loss (dashed, left) and test error (solid, right)")
    return fig


# --- gradient flow over training ------------------------------------------------------------

def _one_run(probe: pd.DataFrame, run: Optional[str]) -> pd.DataFrame:
    if "run" in probe and probe["run"].nunique() > 1:
        if run is None:
            raise GradflowError(f"probe table holds several runs {list(pd.unique(probe['run']))}: pass run=")
        probe = probe[probe["run"] == run]
    if "iteration" not in probe:
        probe = probe.assign(iteration=probe["step"])
    return probe


def heatmap_table(probe: pd.DataFrame, column: str = "grad_ratio", run: Optional[str] = None) -> pd.DataFrame:
    """log10(column), units (rows) x iterations (columns): the data of :func:`gradient_heatmap`."""
    body = unit_rows(_one_run(probe, run))
    values = np.log10(positive_values(body[column]))
    return body.assign(value=values).pivot_table(index="unit", columns="iteration", values="value")


def _heatmap(ax, probe: pd.DataFrame, column: str, run: Optional[str]):
    grid = heatmap_table(probe, column, run)
    its, units = grid.columns.to_numpy(float), grid.index.to_numpy(float)

    def edges(v):
        if len(v) == 1:
            return np.array([v[0] - 0.5, v[0] + 0.5])
        mid = (v[1:] + v[:-1]) / 2
        return np.concatenate([[v[0] - (mid[0] - v[0])], mid, [v[-1] + (v[-1] - mid[-1])]])

    mesh = ax.pcolormesh(edges(its), edges(units), grid.to_numpy(), cmap="viridis", shading="flat")
    ax.set_ylabel("unit l (input → output)")
    return mesh


@styled
def gradient_heatmap(probe: pd.DataFrame, column: str = "grad_ratio", run: Optional[str] = None,
                     title: Optional[str] = None) -> Figure:
    """Depth x iteration heatmap of log10 of ``column`` (default the total gradient ratio)."""
    fig, ax = subplots(figsize=(PANEL_W * 1.6, PANEL_H * 1.3))
    mesh = _heatmap(ax, probe, column, run)
    fig.colorbar(mesh, ax=ax, label=f"log10 {column}")
    ax.set_xlabel("iteration")
    axes_title(ax, title or f"log10 {column} per unit over training", fig)
    return fig


def decay_rate_over_training_table(probe: pd.DataFrame, columns: Iterable[str] = ("grad_ratio", "direct_ratio"),
                                   run: Optional[str] = None) -> pd.DataFrame:
    """Fitted decay rate (and 95% CI) of each column at each probed iteration."""
    probe = _one_run(probe, run)
    rows = []
    for it, table in probe.groupby("iteration", sort=True):
        for column in columns:
            if column in table and (pd.to_numeric(table[column], errors="coerce") > 0).any():
                fit = decay_rate(table, column).as_dict()
                rows.append({"iteration": it, "quantity": column, **{k: float(v) for k, v in fit.items()}})
    return pd.DataFrame(rows)


# the rates are fitted to the natural log of the ratio, counted from the output toward the input,
# with one intercept per stage (theory.fits.shape_groups): the jumps at projections are not in them
RATE_LABEL = "d ln(ratio) per unit toward\ninput, in-stage (> 0: grows)"
LABELS = {"grad_ratio": "total", "direct_ratio": "direct term", "ref_ratio": "identity-path reference"}


def _rates_over_training(ax, probe, columns, run):
    table = decay_rate_over_training_table(probe, columns, run)
    for i, (q, sub) in enumerate(table.groupby("quantity", sort=False)):
        c = [COLOURS["total"], COLOURS["direct"], COLOURS["predicted"]][i % 3]
        ax.plot(sub["iteration"], sub["slope"], marker=".", color=c, label=LABELS.get(q, q))
        ax.fill_between(sub["iteration"], sub["ci_low"], sub["ci_high"], color=c, alpha=0.2, lw=0)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("iteration")
    ax.set_ylabel(RATE_LABEL)
    ax.legend(fontsize="small")


@styled
def decay_rate_over_training(probe: pd.DataFrame, columns: Sequence[str] = ("grad_ratio", "direct_ratio"),
                             run: Optional[str] = None, title: Optional[str] = None) -> Figure:
    """Fitted change of log(ratio) per unit toward the input, at each probed iteration (95% band)."""
    fig, ax = subplots(figsize=(PANEL_W * 1.6, PANEL_H * 1.2))
    _rates_over_training(ax, probe, columns, run)
    axes_title(ax, title or "Fitted change of ln(gradient ratio) per unit toward the input, within stages, over training", fig)
    return fig


@styled
def gradient_flow_over_training(probe: pd.DataFrame, column: str = "grad_ratio", run: Optional[str] = None,
                                title: Optional[str] = None) -> Figure:
    """The heatmap of :func:`gradient_heatmap` above the rates of :func:`decay_rate_over_training`."""
    fig, (top, bottom) = subplots(2, 1, figsize=(PANEL_W * 1.7, PANEL_H * 2.2), sharex=True,
                                      height_ratios=[2, 1])
    mesh = _heatmap(top, probe, column, run)
    fig.colorbar(mesh, ax=top, label=f"log10 {column}")
    top.set_title(f"log10 {column} per unit")
    _rates_over_training(bottom, probe, (column, "direct_ratio"), run)
    fig_title(fig, title or "Gradient flow over training")
    return fig


