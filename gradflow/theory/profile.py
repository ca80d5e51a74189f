"""Fits of a gradient profile that say when they do not fit (docs/theory.md, section 4).

Per group of units that read the same shape (a stage, its downsampling unit
counted with the stage it reads from), two models of the ratio of batch
medians R_l = median_i ||dE/dx_l||_i / median_i ||dE/dx_L||_i:

* exponential: log R_l = a + s (l_top - l): a rate s per unit toward the input;
* power law in Var(x_l): log R_l = a + p log Var(x_l) (mean field predicts
  p = -1/2, :mod:`gradflow.theory.total`; with Var(x_l) linear in l this is a
  power law in depth).

The better one is the one with the higher R^2 (both have two parameters), and
it is named with its evidence. Where neither reaches ``FIT_R2``, or the profile
is not monotone (a U-shape: an interior extreme beyond both ends by more than
``U_TOL``), the verdict is "neither" and no rate is a verdict. Intervals come
from a bootstrap over samples (all units of a resampled sample move together,
so the correlation of residuals along depth is kept), over the batches' samples
pooled; a single seed's interval says nothing about other seeds.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from gradflow.theory.fits import shape_groups

FIT_R2 = 0.95        # below this R^2 a model does not describe the profile
MIN_UNITS = 5        # fewer units than this: no shape is judged
MIN_VAR = np.log(1.5)   # Var(x_l) must change by more than this factor, steadily, for a power law in it
U_TOL = 0.1          # an interior log-extreme beyond both ends by more than this: not monotone
N_BOOT = 200
LEVEL = 0.95


def _matrix(samples: pd.DataFrame, units: pd.DataFrame, column: str):
    """Per-sample norms [units, samples] of the body (one step or pooled) and the x_L row [samples]."""
    s = samples.assign(_id=samples["step"].astype(str) + ":" + samples["sample"].astype(str))
    tops = set(units.loc[units["is_top"].astype(bool), "unit"].astype(int))
    wide = s.pivot_table(index="unit", columns="_id", values=column, aggfunc="first")
    gtop = s.pivot_table(index="unit", columns="_id", values="grad_norm", aggfunc="first")
    top = gtop.loc[[u for u in gtop.index if u in tops]].mean(axis=0)
    body = wide.loc[[u for u in wide.index if u not in tops]]
    return body.index.to_numpy(int), body.to_numpy(float), top.reindex(body.columns).to_numpy(float)


def _lines(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope and R^2 of y[..., n] on x[n], vectorised over leading axes."""
    xc = x - x.mean()
    yc = y - y.mean(axis=-1, keepdims=True)
    sxx = float(xc @ xc)
    slope = (yc @ xc) / sxx if sxx > 0 else np.full(y.shape[:-1], np.nan)
    ss = (yc ** 2).sum(axis=-1)
    res = ((yc - slope[..., None] * xc) ** 2).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss > 0, 1 - res / ss, 1.0)
    return slope, r2


def shape_of(logr: np.ndarray) -> str:
    """"monotone" or "U-shaped" / "cap-shaped" for a log profile ordered from the input to the output."""
    ends_lo, ends_hi = min(logr[0], logr[-1]), max(logr[0], logr[-1])
    if len(logr) > 2 and logr[1:-1].min() < ends_lo - U_TOL:
        return "U-shaped"
    if len(logr) > 2 and logr[1:-1].max() > ends_hi + U_TOL:
        return "cap-shaped"
    return "monotone"


def _steady(logvar: np.ndarray) -> bool:
    """Var(x_l) changes by more than x1.5 and monotonically with depth (Spearman |rho| >= 0.9)."""
    if not np.isfinite(logvar).all() or np.ptp(logvar) <= MIN_VAR or len(logvar) < 3:
        return False
    ranks = np.argsort(np.argsort(logvar))
    rho = np.corrcoef(ranks, np.arange(len(logvar)))[0, 1]
    return bool(abs(rho) >= 0.9)


def fit_profile(unit: np.ndarray, logr: np.ndarray, logvar: Optional[np.ndarray],
                boot: Optional[np.ndarray] = None, level: float = LEVEL) -> dict:
    """Both models on one group's log profile (``boot``: [resamples, units] for the intervals)."""
    order = np.argsort(unit)
    unit, logr = unit[order], logr[order]
    d = (unit.max() + 1 - unit).astype(float)          # units from the group's top
    out: dict = dict(units=[int(unit[0]), int(unit[-1])], n=int(len(unit)), shape=shape_of(logr),
                     change=float(np.exp(logr[0] - logr[-1])))
    models = {"exponential": d}
    if logvar is not None and _steady(logvar[order]):
        models["power law"] = logvar[order]
    for name, x in models.items():
        slope, r2 = _lines(x, logr)
        fit = dict(slope=float(slope), r2=float(r2), ci_low=float("nan"), ci_high=float("nan"))
        if boot is not None and len(boot) > 1:
            bs, _ = _lines(x, boot[:, order])
            bs = bs[np.isfinite(bs)]
            if len(bs):
                fit["ci_low"], fit["ci_high"] = (float(q) for q in np.quantile(bs, [(1 - level) / 2,
                                                                                  (1 + level) / 2]))
        out[name] = fit
    if len(unit) < MIN_UNITS:
        out["better"], out["why"] = None, f"{len(unit)} units: too few to tell a shape"
        return out
    best = max(models, key=lambda m: out[m]["r2"])
    other = [m for m in models if m != best]
    evidence = f"R^2 {out[best]['r2']:.3f}" + (f", {other[0]} {out[other[0]]['r2']:.3f}" if other else
                                               ", no power law: Var(x_l) does not change steadily")
    if out["shape"] != "monotone":
        out["better"], out["why"] = None, f"{out['shape']}: neither model fits ({evidence})"
    elif out[best]["r2"] < FIT_R2:
        out["better"], out["why"] = None, f"neither model fits (best {best}, {evidence})"
    else:
        out["better"], out["why"] = best, evidence
    return out


def profile_fits(samples: pd.DataFrame, units: pd.DataFrame, column: str = "grad_norm",
                 n_boot: int = N_BOOT, seed: int = 0) -> list[dict]:
    """One :func:`fit_profile` per group of units reading one shape, with bootstrap intervals.

    Args:
        samples: the tracer's per-sample table (``step``, ``sample``, ``unit``, ``grad_norm``, ``column``).
        units: its units table (``is_top``, ``x_shape`` or ``stage``, ``x_var``); steps are pooled.
        column: the per-sample norm whose profile is fitted (``grad_norm`` or ``direct_norm``).
    Returns:
        Per group: the :func:`fit_profile` dict plus ``group`` (its shape). A group
        where the ratio is 0 or missing at some unit gets ``better=None`` and says so.
    """
    if samples is None or samples.empty or column not in samples:
        return []
    idx, G, top = _matrix(samples, units, column)
    body = units[~units["is_top"].astype(bool)]
    meta = body.groupby("unit").first()
    if "x_var" in body:
        meta["x_var"] = body.groupby("unit")["x_var"].mean()
    meta["group"] = shape_groups(meta.assign(step=0))
    meta = meta.reindex(idx)
    S = G.shape[1]
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, S, size=(n_boot, S))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.median(G, axis=1) / np.median(top)
        boot = np.median(G[:, pick], axis=2) / np.median(top[pick], axis=1)[None, :]   # [units, n_boot]
    out = []
    for group, rows in meta.groupby("group", sort=False):
        sel = np.isin(idx, rows.index.to_numpy())
        r = ratio[sel]
        fit: dict
        if not (np.isfinite(r).all() and (r > 0).all()):
            fit = dict(units=[int(idx[sel].min()), int(idx[sel].max())], n=int(sel.sum()), better=None,
                       shape="zero", why="the ratio is 0 (or not recorded) at some unit: no fit")
        else:
            logvar = np.log(rows["x_var"].to_numpy(float)) if "x_var" in body else None
            b = np.log(boot[sel].T)
            b = b[np.isfinite(b).all(axis=1)]
            fit = fit_profile(idx[sel], np.log(r), logvar, b)
        out.append(dict(group=str(group).split("/")[0], **fit))
    return out
