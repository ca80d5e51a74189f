"""Figures of paths and lesions (Veit et al. 2016): path lengths, gradient per length, lesion curves."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure


from gradflow.plot.style import (styled, subplots)


# --- paths and lesions (Veit et al. 2016) -------------------------------------------------------
# Tables from gradflow.tracing.paths.components (path_components, sample_paths), a run's paths.csv and gradflow.experiments.lesion.

def _length_axes(fig: Figure, ax, title: str) -> Figure:
    """Log gradient norm against path length k at the first unit's input, with the legend."""
    ax.set_yscale("log")
    ax.set(xlabel="path length k", ylabel="gradient norm at the input", title=title)
    ax.legend(fontsize=7)
    return fig


def _first_unit(exact: pd.DataFrame) -> pd.DataFrame:
    t = exact[exact["unit"] == exact["unit"].min()]
    return t[t["k"] >= 0].sort_values("k")


@styled
def path_length_distribution(ns: Mapping[str, int]) -> Figure:
    """Share of the 2^n paths through k branches (Veit Fig. 6a), one curve per network ({label: n units})."""
    from gradflow.theory.paths import path_counts
    fig, ax = subplots(figsize=(5, 3.2))
    for label, n in ns.items():
        c = path_counts(n)
        ax.bar(c["k"], c["share"], alpha=0.55, label=f"{label} (n = {n})")
    ax.set(xlabel="path length k (residual branches passed)", ylabel="share of all paths",
           title="Path lengths: Binomial(n, 1/2)")
    ax.legend()
    return fig


@styled
def gradient_per_length(exact: pd.DataFrame, sampled: Optional[pd.DataFrame] = None, label: str = "") -> Figure:
    """Gradient norm of one path per length k at the first unit's input, log scale (Veit Fig. 6b).

    The exact ||g^(k)|| / C(n, k) (the norm of the mean path) beside Veit's estimate, the norm of
    one sampled path per k (``sample_paths``).

    Args:
        exact: :func:`gradflow.tracing.paths.path_components`' table (``res.table``).
        sampled: :func:`gradflow.tracing.paths.sample_paths`' table, if any.
        label: the network's name in the legend.
    Returns:
        A matplotlib Figure.
    """
    t = _first_unit(exact)
    fig, ax = subplots(figsize=(5, 3.2))
    ax.plot(t["k"], t["norm"] / t["n_paths"], "-", color="C0", label="exact: ||g^(k)|| / C(n,k) (mean path)")
    if sampled is not None and len(sampled):
        s = sampled.sort_values("k")
        ax.errorbar(s["k"], s["path_norm"], yerr=s["path_norm_std"], fmt="o", ms=3, color="C1", alpha=0.8,
                    label=f"Veit's estimate: one sampled path ({int(s['samples'].iloc[0])} per k)")
    return _length_axes(fig, ax, f"Gradient per path {label}")


@styled
def contribution_by_length(exact: pd.DataFrame, sampled: Optional[pd.DataFrame] = None, label: str = "",
                           mass: float = 0.9) -> Figure:
    """Total gradient by path length (Veit Fig. 6c) beside the exact ||g^(k)||; the effective range shaded.

    The sampled estimate is path norm x C(n, k); the exact ||g^(k)|| includes the cancellation
    between paths.
    """
    from gradflow.theory.paths import effective_range
    t = _first_unit(exact)
    r = effective_range(exact, mass=mass)
    fig, ax = subplots(figsize=(5, 3.2))
    ax.plot(t["k"], t["norm"], "-", color="C0", label="exact ||g^(k)||")
    if sampled is not None and len(sampled):
        s = sampled.sort_values("k")
        ax.plot(s["k"], s["total"], "o--", ms=3, color="C1", label="Veit: path norm x C(n,k)")
    ax.axvspan(r["lo"] - 0.5, r["hi"] + 0.5, color="C0", alpha=0.12,
               label=f"{int(mass * 100)}% of exact gradient: k = {r['lo']}-{r['hi']} (peak {r['peak']})")
    return _length_axes(fig, ax, f"Contribution by length {label}")


@styled
def spectrum_by_unit(exact: pd.DataFrame, label: str = "") -> Figure:
    """log10 of ||g_l^(k)|| / ||dE/dx_l|| for every unit l (rows) and path length k (columns)."""
    t = exact[exact["k"] >= 0]
    grid = t.pivot_table(index="unit", columns="k", values="share")
    fig, ax = subplots(figsize=(6, 3.6))
    im = ax.imshow(np.log10(grid.to_numpy(dtype=float)), aspect="auto", origin="lower", cmap="viridis",
                   vmin=-6, vmax=0)
    fig.colorbar(im, ax=ax, label="log10 ||g^(k)|| / ||dE/dx_l||")
    ax.set(xlabel="path length k", ylabel="unit l", title=f"Gradient by path length, every unit {label}")
    return fig


@styled
def contribution_over_training(paths: pd.DataFrame, label: str = "", mass: float = 0.9) -> Figure:
    """Exact ||g^(k)|| at the first unit by path length, one curve per probed iteration (paths.csv).

    The legend gives each probe's effective range (the shortest window of lengths holding ``mass``
    of sum_k ||g^(k)||) and whether the remainder beyond ``--probe-paths`` holds too much to tell.
    """
    from gradflow.theory.paths import effective_range
    its = sorted(paths["iteration"].unique())
    fig, ax = subplots(figsize=(5.5, 3.4))
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


@styled
def lesion_curves(results: Sequence) -> Figure:
    """Three panels from :class:`gradflow.experiments.lesion.LesionResult` s: one unit removed, k removed, reordered
    (Veit Fig. 3, 5a, 5b)."""
    fig, axes = subplots(1, 3, figsize=(12, 3.4))
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
