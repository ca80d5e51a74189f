"""The network-level summary of a units table: fitted rates beside the paper's predictions."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from gradflow.theory.fits import decay_rate, variance_growth
from gradflow.theory.predict import COVERED, predict_direct, predicted_rate


def summarize(units: pd.DataFrame, tol: float = 1e-4) -> dict:
    """Network-level summary of a units table: fitted rates beside eq. (5)/(8)'s closed form.

    ``direct_rate`` is about the direct term alone, the quantity eq. (5) and (8)
    describe; ``total_rate`` is the whole dE/dx_l, which the residual paths also
    carry (with BN they can amplify it; docs/theory.md, section 6). They are
    reported side by side and never forced to agree. ``direct_obeys_closed_form``
    checks the direct/residual split where eq. (5)/(8) cover the units
    (docs/theory.md, section 2): it holds by construction, so it is a test of
    the tracer, not a finding. The rates' intervals are least-squares ones that
    treat residuals along depth as independent (``ci_kind``); the probe's
    bootstrap over samples (:func:`gradflow.theory.profile.profile_fits`) is the
    interval to quote.
    """
    if units.empty:
        return {}
    pred = predicted_rate(units)
    # predicted_direct_rate is None where eq. (5)/(8) cover no unit
    out: dict = {"predicted_direct_rate": pred if math.isfinite(pred) else None,
                 "n_units": int((~units["is_top"]).sum() / units["step"].nunique()),
                 "steps": int(units["step"].nunique()),
                 "ci_kind": "least squares, residuals along depth taken as independent (too narrow or wide)"}
    total = decay_rate(units, "grad_ratio")
    out["total_rate"] = total.as_dict()
    if "direct_ratio" in units and units["direct_ratio"].notna().any():
        direct = decay_rate(units, "direct_ratio")
        out["direct_rate"] = direct.as_dict()
        joined = predict_direct(units)
        body = joined[~joined["is_top"]]
        covered = body["pred_basis"].isin(COVERED)
        out["covered_units"] = int(covered.sum())
        ratio = body.loc[covered, "direct_vs_pred"].replace([np.inf, -np.inf], np.nan).dropna()
        if len(ratio):
            out["direct_vs_pred_max_error"] = float((ratio - 1).abs().max())
            out["direct_obeys_closed_form"] = bool(out["direct_vs_pred_max_error"] <= tol)
    if "cancel_frac" in units:
        out["cancel_frac_max"] = float(units["cancel_frac"].max())
    if "x_var" in units and units["x_var"].notna().sum() > 3:
        out["variance"] = variance_growth(units)
    return out


def per_unit(units: pd.DataFrame) -> pd.DataFrame:
    """One row per unit (body only, x_L left out), numeric columns averaged over the recorded steps.

    Args:
        units: a units table (``Tracer.units``), one or several steps.
    Returns:
        Columns ``unit``, ``name``, ``stage``, ``x_shape`` (and ``pred_basis`` where
        present) and the step-means of every numeric column, sorted by unit.
    """
    body = units[~units["is_top"].astype(bool)] if "is_top" in units else units
    num = body.groupby("unit").mean(numeric_only=True)
    keep = [c for c in ("name", "stage", "x_shape", "kind", "pred_basis", "mf_basis") if c in body]
    meta = body.groupby("unit")[keep].first()
    return meta.join(num.drop(columns=[c for c in ("stage", "step") if c in num]), how="left").reset_index()
