"""The figure functions: gradflow's tables in, matplotlib Figures out (paper style; nothing written).

Every function takes tables as gradflow writes them (``tr.units``,
``tr.samples``, a run's log or ``probe.csv``; see :mod:`gradflow.runs`) and
returns a :class:`matplotlib.figure.Figure`. Nothing here writes files or
changes global matplotlib state: each figure is drawn inside one seaborn
style context (:func:`style`), so a notebook's own settings are left alone.

Several configurations are passed either as a dict ``{label: table}`` or as one
table with a ``config`` column (``by=`` names another column); each gets its
own panel, in the order given.

Units on the figures: gradient "ratios" are the batch mean of the per-sample
||dE/dx_l|| / ||dE/dx_L||, so x_L (the head's input) is 1 by definition; the
direct term is dE/dx_L carried back through shortcuts and after-addition
activations only (eq. 5 and 8), the prediction is
:func:`gradflow.theory.predict_direct`. Decay rates are changes of log(ratio)
per unit toward the input (positive: grows toward the input).

Sizes: every figure is laid out with constrained layout and sized so that a
plain ``fig.savefig(path)`` holds its titles and legends whole; long titles are
wrapped to the figure's width. Vertical lines mark where the signal changes
shape (the projection shortcuts), between the last unit that reads the old
shape and the first that reads the new one.
"""
from __future__ import annotations

import contextlib
import functools
import math
import textwrap
from typing import Iterable, Mapping, Optional, Sequence, Union

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .errors import GradflowError
from .theory import decay_rate, per_unit, predict_direct, shape_groups, variance_growth

Records = Union[pd.DataFrame, Mapping[str, pd.DataFrame]]

PANEL_W, PANEL_H = 3.4, 2.6   # inches per panel: two panels span a paper's text width
MIN_W = 6.0                   # inches: a figure narrower than this cannot hold its title and legend
COLOURS = {"total": "#0173b2", "direct": "#de8f05", "predicted": "#222222", "fit": "#cc3311"}


@contextlib.contextmanager
def style(font_scale: float = 1.0):
    """The one style of gradflow's figures (seaborn 'ticks' + 'paper'), for this block only."""
    import seaborn as sns  # here: seaborn imports scipy.stats (~1 s); the probe's figure needs neither
    rc = {"axes.grid": True, "grid.linestyle": ":", "grid.alpha": 0.6, "legend.frameon": False,
          "figure.dpi": 100, "savefig.dpi": 200}
    with sns.axes_style("ticks", rc=rc), sns.plotting_context("paper", font_scale=font_scale, rc=rc):
        with mpl.rc_context({k: v for k, v in rc.items() if k not in ("backend", "interactive")}):
            yield


def _subplots(*args, **kwargs):
    """``Figure.subplots`` on a Figure outside pyplot: no global figure list, nothing leaks.

    Notebooks display the returned Figure as a cell's value (``fig``), scripts save it.
    """
    w, h = kwargs.pop("figsize")
    fig = Figure(figsize=(max(w, MIN_W), h), layout="constrained")
    return fig, fig.subplots(*args, **kwargs)


def _title(fig: Figure, text: str) -> None:
    """The figure's title, wrapped to its width (constrained layout makes room for every line)."""
    chars = max(30, int(fig.get_figwidth() * 13))   # ~13 characters per inch at the paper context's size
    fig.suptitle("\n".join(textwrap.wrap(text, chars)))


def _ax_title(ax, text: str, fig: Figure, share: float = 1.0, **kwargs) -> None:
    """An axes title wrapped to the axes' share of the figure's width."""
    chars = max(20, int(fig.get_figwidth() * share * 14))
    ax.set_title("\n".join(textwrap.fill(line, chars) for line in text.split("\n")), **kwargs)


def _styled(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with style():
            return fn(*args, **kwargs)
    return wrapper


# --- helpers ------------------------------------------------------------------------------

def _split(records: Records, by: str) -> list[tuple[str, pd.DataFrame]]:
    """[(label, table)] from a dict of tables or one table with a ``by`` column (order kept)."""
    if isinstance(records, Mapping):
        return [(str(k), v) for k, v in records.items()]
    if not isinstance(records, pd.DataFrame):
        raise GradflowError(f"expected a DataFrame or a dict of DataFrames, got {type(records).__name__}")
    if by in records:
        return [(str(k), records[records[by] == k]) for k in pd.unique(records[by])]
    return [("", records)]


def _last_step(units: pd.DataFrame, step: Optional[int]) -> pd.DataFrame:
    if "step" not in units:
        return units
    step = units["step"].max() if step is None else step
    return units[units["step"] == step]


def _body(units: pd.DataFrame) -> pd.DataFrame:
    body = units[~units["is_top"].astype(bool)] if "is_top" in units else units
    return body.sort_values("unit")


def _panels(n: int, ncols: Optional[int] = None, sharex: bool = False, sharey: bool = False,
            w: float = PANEL_W, h: float = PANEL_H):
    ncols = ncols or min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = _subplots(nrows, ncols, figsize=(w * ncols, h * nrows + 0.9), squeeze=False,
                             sharex=sharex, sharey=sharey)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def shape_changes(body: pd.DataFrame) -> np.ndarray:
    """Positions between units where the input shape changes: (l + l') / 2 for consecutive units l, l'.

    That is where a projection shortcut sits: unit l still reads the old shape,
    unit l' the new one, and the norms of x_l and dE/dx_l change meaning there.
    """
    b = body.drop_duplicates("unit").sort_values("unit") if "unit" in body else body
    if b.empty or ("x_shape" not in b and "stage" not in b):
        return np.array([])
    key = shape_groups(b.drop(columns=["step"], errors="ignore"))
    u = b["unit"].to_numpy(float)
    at = np.flatnonzero(key[1:] != key[:-1])
    return (u[at] + u[at + 1]) / 2


def _stage_lines(ax, body: pd.DataFrame) -> None:
    """Dotted verticals where the signal's shape changes (projection shortcuts: norms change meaning)."""
    for i, x in enumerate(shape_changes(body)):
        ax.axvline(x, color="0.5", lw=0.8, ls=":", zorder=0, label="shape change (projection)" if i == 0 else None)


def _legend_below(fig: Figure, axes, ncol: int = 4) -> None:
    """One legend under the panels, with every label any panel uses (once)."""
    seen: dict = {}
    for ax in axes if isinstance(axes, (list, tuple)) else [axes]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(l, h)
    handles, labels = list(seen.values()), list(seen)
    if handles:
        # as many columns as the figure's width holds (a legend wider than the figure is clipped)
        col_w = 0.6 + 0.07 * max(len(l) for l in labels)   # inches: handle + text at the paper font size
        fits = max(1, int(fig.get_figwidth() // col_w))
        fig.legend(handles, labels, loc="outside lower center", ncol=min(ncol, len(handles), fits))


def _positive(y: pd.Series) -> np.ndarray:
    """Values for a log axis: non-positive ones become NaN (a gap, never a fake point)."""
    y = pd.to_numeric(y, errors="coerce").to_numpy(float)
    return np.where(y > 0, y, np.nan)


# --- gradients across depth ---------------------------------------------------------------

@_styled
def gradient_depth(units: Records, by: str = "config", step: Optional[int] = None,
                   ncols: Optional[int] = None, band: bool = True, title: Optional[str] = None) -> Figure:
    """||dE/dx_l|| / ||dE/dx_L|| per unit (log axis): total, direct term, and eq. (5)/(8)'s prediction.

    One panel per configuration. Lines: ``total`` (grad_ratio, with its 5-95%
    per-sample band), ``direct`` (direct_ratio) and ``predicted``
    (pred_direct_ratio from :func:`gradflow.theory.predict_direct`). The
    prediction is about the direct term; the total need not follow it.
    """
    parts = _split(units, by)
    fig, axes = _panels(len(parts), ncols)
    for ax, (label, table) in zip(axes, parts):
        body = _body(predict_direct(_last_step(table, step)))
        x = body["unit"].to_numpy()
        if band and "grad_ratio_q05" in body:
            ax.fill_between(x, _positive(body["grad_ratio_q05"]), _positive(body["grad_ratio_q95"]),
                            color=COLOURS["total"], alpha=0.2, lw=0, label="total, 5-95% of samples")
        ax.plot(x, _positive(body["grad_ratio"]), color=COLOURS["total"], lw=1.6, label="total")
        if "direct_ratio" in body:
            ax.plot(x, _positive(body["direct_ratio"]), color=COLOURS["direct"], lw=1.6, ls="--",
                    label="direct term")
            if not (body["direct_ratio"] > 0).any():
                ax.text(0.03, 0.05, "direct term = 0\n(off the log axis)", transform=ax.transAxes,
                        fontsize="small", color=COLOURS["direct"])
        if "pred_direct_ratio" in body:
            ax.plot(x, _positive(body["pred_direct_ratio"]), color=COLOURS["predicted"], lw=1.0,
                    ls="none", marker=".", ms=3, markevery=max(1, len(x) // 60),
                    label="prediction, eq. (5)/(8)")
        _stage_lines(ax, body)
        ax.set_yscale("log")
        ax.set_title(label, fontsize="medium")
        ax.set_xlabel("unit l (input → output)")
        ax.set_ylabel("||dE/dx_l|| / ||dE/dx_L||")
    _legend_below(fig, axes)
    _title(fig, title or "Gradient norm per unit, relative to the top (x_L): total vs direct term "
                 "vs prediction")
    return fig


def decay_rate_table(units: Records, by: str = "config") -> pd.DataFrame:
    """Fitted change of log(ratio) per unit toward the input, per configuration.

    Columns: ``config``, ``quantity`` (total / direct term / prediction),
    ``slope``, ``ci_low``, ``ci_high``, ``r2``, ``n`` (see
    :func:`gradflow.theory.decay_rate`: one intercept per input shape). The
    prediction's rate is the fitted rate of ``pred_direct_ratio``: log(lambda)
    for constant scaling, the measured gate product for gates, NaN where eq. (8)
    has no closed form (1x1-conv and dropout shortcuts). A quantity that is
    exactly 0 at most units (lambda = 0, products of dropout masks) gets NaN:
    a log-rate fitted to the few non-zero units would mislead.
    """
    rows = []
    for label, table in _split(units, by):
        joined = predict_direct(table)
        for name, column in (("total", "grad_ratio"), ("direct term", "direct_ratio"),
                             ("prediction", "pred_direct_ratio")):
            if column not in joined:
                continue
            values = pd.to_numeric(joined.loc[~joined["is_top"].astype(bool), column], errors="coerce")
            if (values > 0).sum() < 0.5 * len(values):  # mostly exactly 0 (dropout masks, lambda = 0)
                fit = dict(slope=np.nan, ci_low=np.nan, ci_high=np.nan, r2=np.nan, n=0, stderr=np.nan)
            else:
                fit = decay_rate(joined.astype({column: float}), column).as_dict()
            rows.append({by: label, "quantity": name, **{k: float(v) for k, v in fit.items()}})
    return pd.DataFrame(rows)


@_styled
def decay_rates(units: Records, by: str = "config", title: Optional[str] = None) -> Figure:
    """Fitted decay rates with 95% intervals, one row per configuration: total, direct, predicted."""
    table = decay_rate_table(units, by)
    labels = list(pd.unique(table[by]))
    fig, ax = _subplots(figsize=(PANEL_W * 1.8, 0.9 + 0.32 * len(labels)))
    offsets = {"total": -0.2, "direct term": 0.0, "prediction": 0.2}
    colours = {"total": COLOURS["total"], "direct term": COLOURS["direct"],
               "prediction": COLOURS["predicted"]}
    markers = {"total": "o", "direct term": "s", "prediction": "x"}
    for q, sub in table.groupby("quantity", sort=False):
        y = np.array([labels.index(c) for c in sub[by]]) + offsets[q]
        err = np.vstack([sub["slope"] - sub["ci_low"], sub["ci_high"] - sub["slope"]])
        ax.errorbar(sub["slope"].to_numpy(), y, xerr=np.nan_to_num(err), ls="none",
                    marker=markers[q], color=colours[q], ms=4, capsize=2, label=q)
    ax.axvline(0, color="0.5", lw=0.8)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("fitted d log(||dE/dx_l|| / ||dE/dx_L||) per unit toward the input")
    ax.legend(loc="best", fontsize="small")
    _ax_title(ax, title or "Decay rates across depth (95% CI); prediction: log(lambda) for scaling", fig)
    return fig


# --- activations ----------------------------------------------------------------------------

def linear_growth_fit(units: pd.DataFrame, column: str = "x_var") -> pd.Series:
    """The linear-growth prediction of ``column`` per unit: a common slope, one intercept per stage.

    The slope is :func:`gradflow.theory.variance_growth`'s linear fit; each
    group's intercept is the least-squares one given that slope. Indexed like
    the body rows of ``units``.
    """
    body = _body(units)
    fit = variance_growth(body)["linear"]
    key = shape_groups(body)
    resid = body[column] - fit["slope"] * body["unit"]
    return fit["slope"] * body["unit"] + resid.groupby(key).transform("mean")


@_styled
def activation_growth(units: Records, by: str = "config", step: Optional[int] = None,
                      ncols: Optional[int] = None, title: Optional[str] = None) -> Figure:
    """Var(x_l) per unit (points) against the linear-growth prediction (line, per-stage intercepts).

    PAPER.md section 6: with BN, each pre-activation unit adds an O(1) variance,
    so Var(x_l) grows linearly within a stage and resets at projections. The
    panel title gives the fitted slope per unit and which of the linear and
    log-linear fits describes the data better (R^2).
    """
    parts = _split(units, by)
    fig, axes = _panels(len(parts), ncols)
    for ax, (label, table) in zip(axes, parts):
        body = _body(_last_step(table, step))
        ax.plot(body["unit"], body["x_var"], ls="none", marker="o", ms=2.5, color=COLOURS["total"],
                label="measured Var(x_l)")
        fitted = linear_growth_fit(body)
        growth = variance_growth(body)
        # one line per stage, so the resets at projections are not joined up
        for i, (_, idx) in enumerate(body.groupby(shape_groups(body), sort=False).groups.items()):
            ax.plot(body.loc[idx, "unit"], fitted.loc[idx], color=COLOURS["fit"], lw=1.2,
                    label="linear growth (fit, per stage)" if i == 0 else None)
        _stage_lines(ax, body)
        lin, log = growth["linear"], growth["log"]
        ax.set_title(f"{label}\n+{lin['slope']:.3g}/unit, R² lin {lin['r2']:.2f} vs log {log['r2']:.2f}",
                     fontsize="medium")
        ax.set_xlabel("unit l (input → output)")
        ax.set_ylabel("Var(x_l)")
    _legend_below(fig, axes)
    _title(fig, title or "Variance of the signal x_l entering each unit vs linear growth")
    return fig


# --- the direct/residual cosine ------------------------------------------------------------

@_styled
def cosine_distribution(samples: Records, by: str = "config", step: Optional[int] = None,
                        ncols: Optional[int] = None, title: Optional[str] = None) -> Figure:
    """Per-sample cosine between the direct and the residual term of dE/dx_l, per unit.

    Eq. (5)'s argument: the residual term would have to be exactly -1 times the
    direct one, for every sample, to cancel it. Dots are samples (``tr.samples``),
    the line is the per-unit median; cos = -1 is drawn for reference. The
    tracer carries the direct term with a log scale, so the cosine is resolved
    even where the direct term is 0.5^54 times the total.
    """
    parts = _split(samples, by)
    fig, axes = _panels(len(parts), ncols, sharey=True)
    rng = np.random.default_rng(0)
    for ax, (label, table) in zip(axes, parts):
        table = _last_step(table, step)
        span = (table["unit"].min() - 1, table["unit"].max() + 1) if len(table) else (0, 1)
        table = table[np.isfinite(table["cos_direct_residual"])].sort_values("unit")
        jitter = rng.uniform(-0.3, 0.3, len(table))
        x, y = table["unit"].to_numpy() + jitter, table["cos_direct_residual"].to_numpy()
        ax.plot(x, y, ls="none", marker=".", ms=2, alpha=0.35, color=COLOURS["total"], label="one sample")
        med = table.groupby("unit")["cos_direct_residual"].median()
        ax.plot(med.index, med.to_numpy(), color=COLOURS["direct"], lw=1.4, label="median over samples")
        ax.axhline(-1, color=COLOURS["fit"], lw=1, ls="--", label="cos = -1 (full cancellation)")
        ax.set_xlim(*span)
        ax.set_ylim(-1.08, 1.08)
        if table.empty:
            ax.text(0.5, 0.5, "no cosine: the direct\nor residual term is 0", ha="center",
                    va="center", transform=ax.transAxes, fontsize="small")
        ax.set_title(label, fontsize="medium")
        ax.set_xlabel("unit l (input → output)")
        ax.set_ylabel("cos(direct, residual)")
    _legend_below(fig, axes)
    _title(fig, title or "Cosine between the direct and residual terms of dE/dx_l, per sample")
    return fig


# --- training curves (paper Fig. 1, 3, 6) --------------------------------------------------

def _as_log(log) -> pd.DataFrame:
    """A long log table with a ``run`` column, from a table, a dict of tables or Run objects."""
    if isinstance(log, pd.DataFrame):
        return log if "run" in log else log.assign(run="")
    if isinstance(log, Mapping):
        return pd.concat([t.assign(run=str(k)) for k, t in log.items()], ignore_index=True)
    tables = [r.log.assign(run=r.label) for r in log]  # gradflow.runs.Run objects
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


@_styled
def training_curves(log, title: Optional[str] = None, percent: bool = True) -> Figure:
    """Paper Fig. 1 / 6: training loss (dashed, left axis) and test error (solid, right axis) vs iterations.

    ``log``: a long table with ``run``, ``iteration``, ``train_loss``,
    ``test_error`` (a fraction; plotted in % unless ``percent=False``), a dict
    ``{label: log}``, or :class:`gradflow.runs.Run` objects. One colour per run.
    """
    log = _as_log(log)
    runs = list(pd.unique(log["run"]))
    colours = _palette(runs)
    fig, ax = _subplots(figsize=(PANEL_W * 1.6, PANEL_H * 1.3))
    _curves(ax, log, runs, colours, percent)
    _curve_legend(fig, runs, colours)
    _ax_title(ax, title or "Training loss (dashed) and test error (solid)", fig)
    return fig


@_styled
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
    fig, axes = _panels(len(panels), ncols or min(len(panels), 2), w=PANEL_W * 1.3, h=PANEL_H * 1.1)
    for ax, (name, members) in zip(axes, panels.items()):
        _curves(ax, log, members, colours, percent)
        ax.set_title(name, fontsize="medium")
    _curve_legend(fig, runs, colours)
    _title(fig, title or "Training loss (dashed, left) and test error (solid, right)")
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
    body = _body(_one_run(probe, run))
    values = np.log10(_positive(body[column]))
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


@_styled
def gradient_heatmap(probe: pd.DataFrame, column: str = "grad_ratio", run: Optional[str] = None,
                     title: Optional[str] = None) -> Figure:
    """Depth x iteration heatmap of log10 of ``column`` (default the total gradient ratio)."""
    fig, ax = _subplots(figsize=(PANEL_W * 1.6, PANEL_H * 1.3))
    mesh = _heatmap(ax, probe, column, run)
    fig.colorbar(mesh, ax=ax, label=f"log10 {column}")
    ax.set_xlabel("iteration")
    _ax_title(ax, title or f"log10 {column} per unit over training", fig)
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


LABELS = {"grad_ratio": "total", "direct_ratio": "direct term", "ref_ratio": "identity-path reference"}


def _rates_over_training(ax, probe, columns, run):
    table = decay_rate_over_training_table(probe, columns, run)
    for i, (q, sub) in enumerate(table.groupby("quantity", sort=False)):
        c = [COLOURS["total"], COLOURS["direct"], COLOURS["predicted"]][i % 3]
        ax.plot(sub["iteration"], sub["slope"], marker=".", color=c, label=LABELS.get(q, q))
        ax.fill_between(sub["iteration"], sub["ci_low"], sub["ci_high"], color=c, alpha=0.2, lw=0)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("decay rate\n(d log ratio / unit)")
    ax.legend(fontsize="small")


@_styled
def decay_rate_over_training(probe: pd.DataFrame, columns: Sequence[str] = ("grad_ratio", "direct_ratio"),
                             run: Optional[str] = None, title: Optional[str] = None) -> Figure:
    """Fitted change of log(ratio) per unit toward the input, at each probed iteration (95% band)."""
    fig, ax = _subplots(figsize=(PANEL_W * 1.6, PANEL_H * 1.2))
    _rates_over_training(ax, probe, columns, run)
    _ax_title(ax, title or "Fitted gradient decay rate across depth, over training", fig)
    return fig


@_styled
def gradient_flow_over_training(probe: pd.DataFrame, column: str = "grad_ratio", run: Optional[str] = None,
                                title: Optional[str] = None) -> Figure:
    """The heatmap of :func:`gradient_heatmap` above the rates of :func:`decay_rate_over_training`."""
    fig, (top, bottom) = _subplots(2, 1, figsize=(PANEL_W * 1.7, PANEL_H * 2.2), sharex=True,
                                      height_ratios=[2, 1])
    mesh = _heatmap(top, probe, column, run)
    fig.colorbar(mesh, ax=top, label=f"log10 {column}")
    top.set_title(f"log10 {column} per unit")
    _rates_over_training(bottom, probe, (column, "direct_ratio"), run)
    _title(fig, title or "Gradient flow over training")
    return fig


# --- the probe's overview ---------------------------------------------------------------------

def probe_overview(tables: Records, title: Optional[str] = None) -> Figure:
    """The probe's figure: gradient (left) and activation norms (right) per unit, every network on the same axes.

    Left: ||dE/dx_l|| / ||dE/dx_L|| on a log axis, the total (solid), the direct
    term (dashed) and its prediction from eq. (5)/(8) (dotted). Right: ||x_l||
    (per sample, batch mean; log axis). One colour per network; ``tables`` is one
    units table or ``{label: table}``. Plain matplotlib (no seaborn style): the
    probe draws it on every run, and seaborn's import costs about a second.
    """
    if isinstance(tables, pd.DataFrame):
        tables = {"": tables}
    with mpl.rc_context({"axes.grid": True, "grid.alpha": 0.3, "legend.frameon": False}):
        return _probe_overview(tables, title)


def _probe_overview(tables: Mapping[str, pd.DataFrame], title: Optional[str]) -> Figure:
    fig, (ax_g, ax_x) = _subplots(1, 2, figsize=(11, 4.2))
    cmap = mpl.colormaps["tab10" if len(tables) <= 10 else "tab20"]
    colours = [cmap(i % cmap.N) for i in range(len(tables))]
    for (label, units), colour in zip(tables.items(), colours):
        df = per_unit(units)
        u = df["unit"].to_numpy()
        for ax, column, ls, lab, kw in ((ax_g, "grad_ratio", "-", label or "total", {}),
                                        (ax_g, "direct_ratio", "--", None, {}),
                                        (ax_g, "pred_direct_ratio", ":", None, dict(lw=2.2, alpha=0.8)),
                                        (ax_x, "x_norm", "-", label or "||x_l||", {})):
            if column in df:
                ax.plot(u, _positive(df[column]), ls=ls, color=colour, label=lab, **{"lw": 1.4, **kw})
    if len(tables) == 1:
        body = per_unit(next(iter(tables.values())))
        _stage_lines(ax_g, body)
        _stage_lines(ax_x, body)
    ax_g.set(yscale="log", xlabel="unit l (input → output)", ylabel="||dE/dx_l|| / ||dE/dx_L||",
             title="gradient across depth")
    ax_x.set(yscale="log", xlabel="unit l (input → output)", ylabel="||x_l|| (per sample, batch mean)",
             title="activations across depth")
    styles = [Line2D([], [], color="0.3", ls=ls, label=lab) for ls, lab in
              (("-", "total"), ("--", "direct term"), (":", "prediction, eq. (5)/(8)"))]
    ax_g.legend(handles=styles, fontsize="small", loc="best")
    if len(tables) > 1:
        handles = [Line2D([], [], color=c, label=lab) for lab, c in zip(tables, colours)]
        fig.legend(handles=handles, loc="outside right center", fontsize="small")
    if title:
        _title(fig, title)
    return fig


# --- paths and lesions (Veit et al. 2016) -------------------------------------------------------
# Tables from gradflow.paths (path_components, sample_paths), a run's paths.csv and gradflow.lesion.

def _length_axes(fig: Figure, ax, title: str) -> Figure:
    """Log gradient norm against path length k at the first unit's input, with the legend."""
    ax.set_yscale("log")
    ax.set(xlabel="path length k", ylabel="gradient norm at the input", title=title)
    ax.legend(fontsize=7)
    return fig


def _first_unit(exact: pd.DataFrame) -> pd.DataFrame:
    t = exact[exact["unit"] == exact["unit"].min()]
    return t[t["k"] >= 0].sort_values("k")


@_styled
def path_length_distribution(ns: Mapping[str, int]) -> Figure:
    """Share of the 2^n paths through k branches (Veit Fig. 6a), one curve per network ({label: n units})."""
    from .paths import path_counts
    fig, ax = _subplots(figsize=(5, 3.2))
    for label, n in ns.items():
        c = path_counts(n)
        ax.bar(c["k"], c["share"], alpha=0.55, label=f"{label} (n = {n})")
    ax.set(xlabel="path length k (residual branches passed)", ylabel="share of all paths",
           title="Path lengths: Binomial(n, 1/2)")
    ax.legend()
    return fig


@_styled
def gradient_per_length(exact: pd.DataFrame, sampled: Optional[pd.DataFrame] = None, label: str = "") -> Figure:
    """Gradient norm of one path per length k at the first unit's input, log scale (Veit Fig. 6b).

    The exact ||g^(k)|| / C(n, k) (the norm of the mean path) beside Veit's estimate, the norm of
    one sampled path per k (``sample_paths``).
    """
    t = _first_unit(exact)
    fig, ax = _subplots(figsize=(5, 3.2))
    ax.plot(t["k"], t["norm"] / t["n_paths"], "-", color="C0", label="exact: ||g^(k)|| / C(n,k) (mean path)")
    if sampled is not None and len(sampled):
        s = sampled.sort_values("k")
        ax.errorbar(s["k"], s["path_norm"], yerr=s["path_norm_std"], fmt="o", ms=3, color="C1", alpha=0.8,
                    label=f"Veit's estimate: one sampled path ({int(s['samples'].iloc[0])} per k)")
    return _length_axes(fig, ax, f"Gradient per path {label}")


@_styled
def contribution_by_length(exact: pd.DataFrame, sampled: Optional[pd.DataFrame] = None, label: str = "",
                           mass: float = 0.9) -> Figure:
    """Total gradient by path length (Veit Fig. 6c) beside the exact ||g^(k)||; the effective range shaded.

    The sampled estimate is path norm x C(n, k); the exact ||g^(k)|| includes the cancellation
    between paths.
    """
    from .paths import effective_range
    t = _first_unit(exact)
    r = effective_range(exact, mass=mass)
    fig, ax = _subplots(figsize=(5, 3.2))
    ax.plot(t["k"], t["norm"], "-", color="C0", label="exact ||g^(k)||")
    if sampled is not None and len(sampled):
        s = sampled.sort_values("k")
        ax.plot(s["k"], s["total"], "o--", ms=3, color="C1", label="Veit: path norm x C(n,k)")
    ax.axvspan(r["lo"] - 0.5, r["hi"] + 0.5, color="C0", alpha=0.12,
               label=f"{int(mass * 100)}% of exact gradient: k = {r['lo']}-{r['hi']} (peak {r['peak']})")
    return _length_axes(fig, ax, f"Contribution by length {label}")


@_styled
def spectrum_by_unit(exact: pd.DataFrame, label: str = "") -> Figure:
    """log10 of ||g_l^(k)|| / ||dE/dx_l|| for every unit l (rows) and path length k (columns)."""
    t = exact[exact["k"] >= 0]
    grid = t.pivot_table(index="unit", columns="k", values="share")
    fig, ax = _subplots(figsize=(6, 3.6))
    im = ax.imshow(np.log10(grid.to_numpy(dtype=float)), aspect="auto", origin="lower", cmap="viridis",
                   vmin=-6, vmax=0)
    fig.colorbar(im, ax=ax, label="log10 ||g^(k)|| / ||dE/dx_l||")
    ax.set(xlabel="path length k", ylabel="unit l", title=f"Gradient by path length, every unit {label}")
    return fig


@_styled
def contribution_over_training(paths: pd.DataFrame, label: str = "", mass: float = 0.9) -> Figure:
    """Exact ||g^(k)|| at the first unit by path length, one curve per probed iteration (paths.csv).

    The legend gives each probe's effective range (the shortest window of lengths holding ``mass``
    of sum_k ||g^(k)||) and whether the remainder beyond ``--probe-paths`` holds too much to tell.
    """
    from .paths import effective_range
    its = sorted(paths["iteration"].unique())
    fig, ax = _subplots(figsize=(5.5, 3.4))
    colours = mpl.colormaps["viridis"](np.linspace(0, 0.9, len(its)))
    for it, c in zip(its, colours):
        t = paths[(paths["iteration"] == it) & (paths["backward"] == 0)] if "backward" in paths else \
            paths[paths["iteration"] == it]
        r = effective_range(t, mass=mass)
        first = _first_unit(t)
        tail = " (remainder too large: window unknown)" if r["truncated"] else ""
        ax.plot(first["k"], first["norm"], "o-", ms=2.5, color=c,
                label=f"iteration {it}: {int(mass * 100)}% on k = {r['lo']}-{r['hi']}{tail}")
    ax.set_yscale("log")
    ax.set(xlabel="path length k", ylabel="||g^(k)|| at the first unit's input",
           title=f"Gradient by path length during training {label}".rstrip())
    ax.legend(fontsize=6)
    return fig


@_styled
def lesion_curves(results: Sequence) -> Figure:
    """Three panels from :class:`gradflow.lesion.LesionResult` s: one unit removed, k removed, reordered
    (Veit Fig. 3, 5a, 5b)."""
    fig, axes = _subplots(1, 3, figsize=(12, 3.4))
    for i, r in enumerate(results):
        c = f"C{i}"
        if len(r.single):
            s = r.single
            axes[0].plot(s["unit"], s["error"], "o-", ms=3, color=c, label=r.network)
            down = s[s["downsampling"]]
            axes[0].plot(down["unit"], down["error"], "x", color="k", ms=6)
            axes[0].axhline(r.baseline, color=c, ls=":", lw=1)
        if len(r.random):
            g = r.random.groupby("k")["error"]
            axes[1].errorbar(g.mean().index, g.mean(), yerr=g.std().fillna(0), fmt="o-", ms=3, color=c,
                             label=r.network)
        if len(r.reorder):
            axes[2].plot(r.reorder["kendall_tau"], r.reorder["error"], "o", ms=3, color=c, label=r.network)
    axes[0].set(xlabel="unit removed (x: changes shape)", ylabel="test error (%)",
                title="One unit removed (dotted: intact)")
    axes[1].set(xlabel="units removed at random", ylabel="test error (%)", title="k units removed")
    axes[2].set(xlabel="Kendall tau of the unit order", ylabel="test error (%)", title="Units reordered")
    axes[2].invert_xaxis()
    for ax in axes:
        ax.legend(fontsize=7)
    return fig
