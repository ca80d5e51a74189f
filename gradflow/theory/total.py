"""Predictions of the total gradient ||dE/dx_l|| that can fail (docs/theory.md, section 3).

None of them reads the measured gradient; each says what it assumes.

* Mean field (Yang & Schoenholz 2017; De & Smith 2020). For a unit
  x_{l+1} = lambda x_l + F(x_l) (h a scalar multiple, f the identity) whose
  branch Jacobian is independent of the gradient and has mean squared gain
  Var(F) / Var(x_l) (a positively homogeneous branch with random weights, or
  one that normalises its input first), ||dE/dx_l||^2 = ||dE/dx_{l+1}||^2
  (lambda^2 + Var(F)/Var(x_l)) = ||dE/dx_{l+1}||^2 Var(x_{l+1}) / Var(x_l).
  Along a run of such units the product telescopes:
  ||dE/dx_l|| / ||dE/dx_top|| = sqrt(Var(x_top) / Var(x_l)), a power law in
  Var(x_l) with exponent -1/2, computed from the forward variances alone.
  With Var(x_l) linear in l (De & Smith's pre-activation BN nets) it is a power
  law in depth, not an exponential. BatchNorm's own backward amplification
  inside the branch (Yang et al. 2019) is not in it: where BN sits inside the
  branch the law undershoots the measured growth, and the gradient scale
  coefficient below measures by how much.
* Isotropy (free independence). Each unit's Jacobian gain
  g_l^2 = E_u ||J_l^T u||^2 / ||u||^2 over Gaussian directions u (the probe's
  ``gain_sq``, one vjp per unit on a random direction), multiplied along depth:
  ||dE/dx_l|| / ||dE/dx_L|| = prod_{i>=l} g_i. It holds for any network whose
  gradient is not aligned with the Jacobians' special directions, and fails
  where it is; compared with the ratio of the batch's RMS norms.
* Gradient scale coefficient (Philipp et al. 2018), a measurement beside the raw
  ratio, not a prediction: GSC_l = (||dE/dx_l|| / ||dE/dx_L||) (||x_l|| / ||x_L||).
  The mean-field law above gives GSC = 1 within a run; the excess is growth the
  forward scale does not explain.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from gradflow.theory.predict import COVERED, coverage

MF_EXPONENT = -0.5   # the mean-field power of Var(x_l)


def meanfield_total(units: pd.DataFrame) -> pd.DataFrame:
    """Add ``mf_factor`` (sqrt(Var(x_top)/Var(x_l)) along covered runs), ``mf_anchor`` and ``mf_basis``.

    ``mf_anchor`` is the unit at the top of the run (-1: x_L); the predicted
    ratio relative to ||dE/dx_L|| is ``mf_factor`` times the anchor's ratio
    (exactly ``mf_factor`` for a run that ends at x_L). Units the law does not
    cover (activation after the addition, projections, data-dependent h, no
    ``x_var``) get NaN and their reason in ``mf_basis``.
    """
    out = []
    for _, df in units.groupby("step", sort=True):
        df = df.sort_values("unit").copy()
        top = df["is_top"].astype(bool)
        body = df[~top]
        basis = coverage(body).to_numpy(object).copy()
        var = body["x_var"].to_numpy(float) if "x_var" in body else np.full(len(body), np.nan)
        top_var = float(df.loc[top, "x_var"].iloc[0]) if "x_var" in df and top.any() else float("nan")
        covered = np.isin(basis, COVERED) & np.isfinite(var) & (var > 0)
        factor, anchor = np.full(len(body), np.nan), np.full(len(body), np.nan)
        run_var, run_anchor = top_var, -1
        idx = body["unit"].to_numpy()
        for i in range(len(body) - 1, -1, -1):
            if covered[i] and np.isfinite(run_var):
                factor[i], anchor[i] = np.sqrt(run_var / var[i]), run_anchor
                basis[i] = "mean field"
            else:
                run_var, run_anchor = var[i], int(idx[i])
                if basis[i] in COVERED:
                    basis[i] = "not covered: no Var(x_l) recorded"
        df.loc[body.index, "mf_factor"] = factor
        df.loc[body.index, "mf_anchor"] = anchor
        df.loc[body.index, "mf_basis"] = basis
        out.append(df)
    return pd.concat(out) if out else units.copy()


def isotropy_total(units: pd.DataFrame) -> pd.DataFrame:
    """Add ``iso_ratio``: prod_{i>=l} sqrt(gain_sq_i), NaN below a unit without a measured gain."""
    out = []
    for _, df in units.groupby("step", sort=True):
        df = df.sort_values("unit").copy()
        top = df["is_top"].astype(bool)
        body = df[~top]
        if "gain_sq" not in body:
            df["iso_ratio"] = np.nan
        else:
            g = np.sqrt(body["gain_sq"].to_numpy(float))[::-1]
            df.loc[body.index, "iso_ratio"] = np.cumprod(g)[::-1]   # NaN propagates toward the input
            df.loc[top, "iso_ratio"] = 1.0
        out.append(df)
    return pd.concat(out) if out else units.copy()


def gradient_scale(units: pd.DataFrame, ratio: str = "grad_ratio_med", norm: str = "x_norm_q50") -> pd.DataFrame:
    """Add ``gsc``: Philipp et al.'s gradient scale coefficient, ``ratio`` x ||x_l|| / ||x_L|| per step."""
    out = []
    for _, df in units.groupby("step", sort=True):
        df = df.copy()
        top = df[df["is_top"].astype(bool)]
        r = ratio if ratio in df else "grad_ratio"
        n = norm if norm in df else "x_norm"
        if top.empty or r not in df or n not in df:
            df["gsc"] = np.nan
        else:
            df["gsc"] = df[r] * df[n] / float(top[n].iloc[0])
        out.append(df)
    return pd.concat(out) if out else units.copy()


def predict_total(units: pd.DataFrame) -> pd.DataFrame:
    """All three columns families: :func:`meanfield_total`, :func:`isotropy_total`, :func:`gradient_scale`."""
    return gradient_scale(isotropy_total(meanfield_total(units)))


def with_predictions(units: pd.DataFrame) -> pd.DataFrame:
    """A units table with every prediction and robust ratio joined (idempotent): eq. (5)/(8) where they
    cover a unit, the ratio of medians, mean field, isotropy and the gradient scale coefficient."""
    from gradflow.theory.predict import predict_direct
    from gradflow.theory.robust import median_ratios
    u = units
    if "pred_basis" not in u and "direct_ratio" in u:
        u = predict_direct(u)
    if "grad_ratio_med" not in u:
        u = median_ratios(u)
    if "iso_ratio" not in u:
        u = predict_total(u)
    return u


def meanfield_anchored(df: pd.DataFrame, column: str = "grad_ratio_med") -> np.ndarray:
    """Per-unit rows (one step): the mean-field ratio, anchored at the measured ``column`` of each run's top."""
    at = dict(zip(df["unit"], df[column])) if column in df else {}
    top = 1.0
    anchor = df["mf_anchor"].to_numpy(float) if "mf_anchor" in df else np.full(len(df), np.nan)
    base = np.array([top if a == -1 else at.get(int(a), np.nan) if np.isfinite(a) else np.nan for a in anchor])
    return df["mf_factor"].to_numpy(float) * base if "mf_factor" in df else np.full(len(df), np.nan)
