"""Figures across depth: gradients and their decay rates, activations, the direct/residual cosine, the probe's overview."""
from __future__ import annotations

from typing import Mapping, Optional

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from gradflow.theory import decay_rate, per_unit, predict_direct, shape_groups, variance_growth
from gradflow.theory.predict import COVERED
from gradflow.theory.total import meanfield_anchored, with_predictions

from gradflow.plot.style import (COLOURS, PANEL_W, Records, at_step, axes_title, fig_title, legend_below,
                                 panel_grid, positive_values, split_records, stage_lines, styled, subplots,
                                 unit_rows)


# --- gradients across depth ---------------------------------------------------------------

@styled
def gradient_depth(units: Records, by: str = "config", step: Optional[int] = None,
                   ncols: Optional[int] = None, band: bool = True, title: Optional[str] = None) -> Figure:
    """||dE/dx_l|| / ||dE/dx_L|| per unit (log axis): total, direct term, and the predictions.

    One panel per configuration. Lines: ``total`` and ``direct`` (ratios of
    batch medians; the total with the 5-95% band of per-sample ratios);
    predictions of the total that can fail: ``isotropy`` (iso_ratio) and ``mean
    field`` (anchored at each covered run's top; docs/theory.md, section 3).
    Eq. (5)/(8) points are drawn only at the units they cover, from the closed
    form (:func:`gradflow.theory.predict_direct`), and labelled as exact by
    construction; a panel where they cover no unit says why.

    Args:
        units: a units table (``tr.units``, a probe's ``units.csv``), ``{label: table}``,
            or one table with a ``by`` column; one panel per configuration.
        by: the column that names the configurations.
        step: the recorded step to draw; None: the last.
        ncols: panels per row; None chooses.
        band: draw the 5-95% per-sample band of the total.
        title: the figure's title.
    Returns:
        A matplotlib Figure (nothing is written).
    """
    parts = split_records(units, by)
    fig, axes = panel_grid(len(parts), ncols)
    for ax, (label, table) in zip(axes, parts):
        df = per_unit(with_predictions(at_step(table, step)))
        x = df["unit"].to_numpy()
        total = df["grad_ratio_med"] if "grad_ratio_med" in df else df["grad_ratio"]
        if band and "grad_ratio_q05" in df:
            ax.fill_between(x, positive_values(df["grad_ratio_q05"]), positive_values(df["grad_ratio_q95"]),
                            color=COLOURS["total"], alpha=0.2, lw=0, label="total, 5-95% of samples")
        ax.plot(x, positive_values(total), color=COLOURS["total"], lw=1.6, label="total (ratio of medians)")
        if "direct_ratio" in df:
            direct = df["direct_ratio_med"] if "direct_ratio_med" in df else df["direct_ratio"]
            ax.plot(x, positive_values(direct), color=COLOURS["direct"], lw=1.6, ls="--",
                    label="direct term")
            if not (df["direct_ratio"] > 0).any():
                ax.text(0.03, 0.05, "direct term = 0\n(off the log axis)", transform=ax.transAxes,
                        fontsize="small", color=COLOURS["direct"])
        _predictions(ax, df, x)
        stage_lines(ax, df)
        ax.set_yscale("log")
        ax.set_title(label, fontsize="medium")
        ax.set_xlabel("unit l (input → output)")
        ax.set_ylabel("||dE/dx_l|| / ||dE/dx_L||")
    legend_below(fig, axes)
    fig_title(fig, title or "Gradient norm per unit, relative to the top (x_L): total, direct term, "
                 "and predictions of the total")
    return fig


def _predictions(ax, df: pd.DataFrame, x: np.ndarray, colour=None, legend: bool = True) -> None:
    """Isotropy and mean-field lines, and eq. (5)/(8) points where they cover a unit (else a note)."""
    if "iso_ratio" in df and df["iso_ratio"].notna().any():
        ax.plot(x, positive_values(df["iso_ratio"]), color=colour or COLOURS["fit"], lw=1.0, ls="-.",
                label="isotropy prediction" if legend else None)
    mf = meanfield_anchored(df)
    if np.isfinite(mf).any():
        ax.plot(x, positive_values(pd.Series(mf)), color=colour or COLOURS["predicted"], lw=1.0, ls=(0, (1, 1)),
                label="mean field (anchored at each run's top)" if legend else None)
    if "pred_direct_ratio" not in df:
        return
    covered = df["pred_basis"].isin(COVERED) if "pred_basis" in df else pd.Series(False, index=df.index)
    if covered.any():
        # the closed form times the anchor's drawn direct term (the ratio of medians, as the line)
        direct = "direct_ratio_med" if "direct_ratio_med" in df else "direct_ratio"
        at = dict(zip(df["unit"], df[direct]))
        anchor = df.loc[covered, "pred_anchor"].to_numpy(float)
        base = np.array([1.0 if a == -1 else at.get(int(a), np.nan) for a in anchor])
        ax.plot(x[covered.to_numpy()], positive_values(pd.Series(df.loc[covered, "pred_direct_factor"].to_numpy()
                                                                 * base)),
                color=colour or COLOURS["predicted"], ls="none", marker=".", ms=3,
                markevery=max(1, int(covered.sum()) // 60),
                label="eq. (5)/(8), where they cover the unit (exact by construction)" if legend else None)
    elif colour is None and "pred_basis" in df and len(df):
        why = str(df["pred_basis"].iloc[0]).removeprefix("not covered: ")
        ax.text(0.03, 0.95, "no eq. (5)/(8) points: " + why, transform=ax.transAxes, fontsize="x-small",
                va="top", wrap=True, color=COLOURS["predicted"])


def decay_rate_table(units: Records, by: str = "config") -> pd.DataFrame:
    """Fitted change of log(ratio) per unit toward the input, per configuration.

    Columns: ``config``, ``quantity`` (total / direct term / prediction),
    ``slope``, ``ci_low``, ``ci_high``, ``r2``, ``n`` (see
    :func:`gradflow.theory.decay_rate`: one intercept per input shape). The
    prediction's rate is the fitted rate of ``pred_direct_ratio`` over the units
    eq. (5)/(8) cover: log(lambda) for constant scaling, NaN where they cover
    none (gates, dropout and 1x1-conv shortcuts, an activation after the
    addition, a table without ``f_identity``). The intervals are least-squares
    ones (see :func:`gradflow.theory.fit_slope`). A quantity that is
    exactly 0 at most units (lambda = 0, products of dropout masks) gets NaN:
    a log-rate fitted to the few non-zero units would mislead.
    """
    rows = []
    for label, table in split_records(units, by):
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


@styled
def decay_rates(units: Records, by: str = "config", title: Optional[str] = None) -> Figure:
    """Fitted decay rates with 95% intervals, one row per configuration: total, direct, predicted.

    Args:
        units: units tables as for :func:`gradient_depth`.
        by: the column that names the configurations.
        title: the figure's title.
    Returns:
        A matplotlib Figure; :func:`decay_rate_table` gives its numbers.
    """
    table = decay_rate_table(units, by)
    labels = list(pd.unique(table[by]))
    fig, ax = subplots(figsize=(PANEL_W * 1.8, 0.9 + 0.32 * len(labels)))
    offsets = {"total": -0.2, "direct term": 0.0, "prediction": 0.2}
    colours = {"total": COLOURS["total"], "direct term": COLOURS["direct"],
               "prediction": COLOURS["predicted"]}
    markers = {"total": "o", "direct term": "s", "prediction": "x"}
    for q, sub in table.groupby("quantity", sort=False):
        if not np.isfinite(sub["slope"].to_numpy(float)).any():
            continue        # no unit is covered (no prediction): no empty legend entry either
        y = np.array([labels.index(c) for c in sub[by]]) + offsets[q]
        err = np.vstack([sub["slope"] - sub["ci_low"], sub["ci_high"] - sub["slope"]])
        ax.errorbar(sub["slope"].to_numpy(), y, xerr=np.nan_to_num(err), ls="none",
                    marker=markers[q], color=colours[q], ms=4, capsize=2, label=q)
    ax.axvline(0, color="0.5", lw=0.8)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("fitted d ln(||dE/dx_l|| / ||dE/dx_L||) per unit\ntoward the input (> 0: grows toward the input)")
    ax.legend(loc="best", fontsize="small")
    axes_title(ax, title or "Decay rates across depth (95% CI); prediction: log(lambda) for scaling", fig)
    return fig


# --- activations ----------------------------------------------------------------------------

def linear_growth_fit(units: pd.DataFrame, column: str = "x_var") -> pd.Series:
    """The linear-growth prediction of ``column`` per unit: a common slope, one intercept per stage.

    The slope is :func:`gradflow.theory.variance_growth`'s linear fit; each
    group's intercept is the least-squares one given that slope. Indexed like
    the body rows of ``units``.
    """
    body = unit_rows(units)
    fit = variance_growth(body)["linear"]
    key = shape_groups(body)
    resid = body[column] - fit["slope"] * body["unit"]
    return fit["slope"] * body["unit"] + resid.groupby(key).transform("mean")


@styled
def activation_growth(units: Records, by: str = "config", step: Optional[int] = None,
                      ncols: Optional[int] = None, title: Optional[str] = None) -> Figure:
    """Var(x_l) per unit (points) against the linear-growth prediction (line, per-stage intercepts).

    docs/theory.md, section 6: with BN, each pre-activation unit adds an O(1) variance,
    so Var(x_l) grows linearly within a stage and resets at projections. The
    panel title gives the fitted slope per unit and which of the linear and
    log-linear fits describes the data better (R^2).
    """
    parts = split_records(units, by)
    fig, axes = panel_grid(len(parts), ncols)
    for ax, (label, table) in zip(axes, parts):
        body = unit_rows(at_step(table, step))
        ax.plot(body["unit"], body["x_var"], ls="none", marker="o", ms=2.5, color=COLOURS["total"],
                label="measured Var(x_l)")
        fitted = linear_growth_fit(body)
        growth = variance_growth(body)
        # one line per stage, so the resets at projections are not joined up
        for i, (_, idx) in enumerate(body.groupby(shape_groups(body), sort=False).groups.items()):
            ax.plot(body.loc[idx, "unit"], fitted.loc[idx], color=COLOURS["fit"], lw=1.2,
                    label="linear growth (fit, per stage)" if i == 0 else None)
        stage_lines(ax, body)
        lin, log = growth["linear"], growth["log"]
        ax.set_title(f"{label}\n+{lin['slope']:.3g}/unit, R² lin {lin['r2']:.2f} vs log {log['r2']:.2f}",
                     fontsize="medium")
        ax.set_xlabel("unit l (input → output)")
        ax.set_ylabel("Var(x_l)")
    legend_below(fig, axes)
    fig_title(fig, title or "Variance of the signal x_l entering each unit vs linear growth")
    return fig


# --- the direct/residual cosine ------------------------------------------------------------

@styled
def cosine_distribution(samples: Records, by: str = "config", step: Optional[int] = None,
                        ncols: Optional[int] = None, title: Optional[str] = None) -> Figure:
    """Per-sample cosine between the direct and the residual term of dE/dx_l, per unit.

    Eq. (5)'s argument: the residual term would have to be exactly -1 times the
    direct one, for every sample, to cancel it. Dots are samples (``tr.samples``),
    the line is the per-unit median; cos = -1 is drawn for reference. The
    tracer carries the direct term with a log scale, so the cosine is resolved
    even where the direct term is 0.5^54 times the total.
    """
    parts = split_records(samples, by)
    fig, axes = panel_grid(len(parts), ncols, sharey=True)
    rng = np.random.default_rng(0)
    for ax, (label, table) in zip(axes, parts):
        table = at_step(table, step)
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
    legend_below(fig, axes)
    fig_title(fig, title or "Cosine between the direct and residual terms of dE/dx_l, per sample")
    return fig


# --- the probe's overview ---------------------------------------------------------------------

def probe_overview(tables: Records, title: Optional[str] = None) -> Figure:
    """The probe's figure: gradient (left) and activation norms (right) per unit, every network on the same axes.

    Left: ||dE/dx_l|| / ||dE/dx_L|| on a log axis, the total (ratio of medians,
    solid), the direct term (dashed), the isotropy (dash-dot) and mean-field
    (dotted) predictions of the total, and eq. (5)/(8) points only where they
    cover a unit (:func:`_predictions`). Right: ||x_l||
    (per sample, batch mean; log axis). One colour per network; ``tables`` is one
    units table or ``{label: table}``. Plain matplotlib (no seaborn style): the
    probe draws it on every run, and seaborn's import costs about a second.

    Args:
        tables: one units table, or ``{label: table}``.
        title: the figure's title.
    Returns:
        A matplotlib Figure.
    """
    if isinstance(tables, pd.DataFrame):
        tables = {"": tables}
    with mpl.rc_context({"axes.grid": True, "grid.alpha": 0.3, "legend.frameon": False}):
        return _probe_overview(tables, title)


def _probe_overview(tables: Mapping[str, pd.DataFrame], title: Optional[str]) -> Figure:
    fig, (ax_g, ax_x) = subplots(1, 2, figsize=(11, 4.2))
    cmap = mpl.colormaps["tab10" if len(tables) <= 10 else "tab20"]
    colours = [cmap(i % cmap.N) for i in range(len(tables))]
    for (label, units), colour in zip(tables.items(), colours):
        df = per_unit(with_predictions(units))
        u = df["unit"].to_numpy()
        total = "grad_ratio_med" if "grad_ratio_med" in df else "grad_ratio"
        direct = "direct_ratio_med" if "direct_ratio_med" in df else "direct_ratio"
        one = len(tables) == 1
        for ax, column, ls, lab in ((ax_g, total, "-", "total (ratio of medians)" if one else label),
                                    (ax_g, direct, "--", "direct term" if one else None),
                                    (ax_x, "x_norm", "-", "||x_l||" if one else label)):
            if column in df:
                ax.plot(u, positive_values(df[column]), ls=ls, color=colour, label=lab, lw=1.4)
        _predictions(ax_g, df, u, colour if len(tables) > 1 else None, legend=len(tables) == 1)
    if len(tables) == 1:
        body = per_unit(next(iter(tables.values())))
        stage_lines(ax_g, body)
        stage_lines(ax_x, body)
    ax_g.set(yscale="log", xlabel="unit l (input → output)", ylabel="||dE/dx_l|| / ||dE/dx_L||",
             title="gradient across depth")
    ax_x.set(yscale="log", xlabel="unit l (input → output)", ylabel="||x_l|| (per sample, batch mean)",
             title="activations across depth")
    if len(tables) == 1:
        ax_g.legend(fontsize="x-small", loc="best")
    else:
        styles = [Line2D([], [], color="0.3", ls=ls, marker=m, label=lab) for ls, m, lab in
                  (("-", None, "total (ratio of medians)"), ("--", None, "direct term"),
                   ("-.", None, "isotropy prediction"), ((0, (1, 1)), None, "mean field (anchored)"),
                   ("none", ".", "eq. (5)/(8) where they cover (by construction)"))]
        ax_g.legend(handles=styles, fontsize="x-small", loc="best")
    if len(tables) > 1:
        handles = [Line2D([], [], color=c, label=lab) for lab, c in zip(tables, colours)]
        fig.legend(handles=handles, loc="outside right center", fontsize="small")
    if title:
        fig_title(fig, title)
    return fig


