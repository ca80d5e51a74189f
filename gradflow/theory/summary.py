"""The network-level summary of a units table: fitted rates beside the paper's predictions."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from gradflow.theory.fits import decay_rate, variance_growth
from gradflow.theory.predict import predict_direct, predicted_rate


def summarize(units: pd.DataFrame, tol: float = 0.05) -> dict:
    """Network-level summary of a units table: fitted rates against the predictions.

    ``direct_rate`` is about the direct term alone, the quantity eq. (5) and (8)
    predict; ``total_rate`` is the whole dE/dx_l, which the residual paths also
    carry (with BN they can amplify it; PAPER.md section 8). They are reported
    side by side and never forced to agree.
    """
    if units.empty:
        return {}
    pred = predicted_rate(units)
    out: dict = {"predicted_direct_rate": pred, "n_units": int((~units["is_top"]).sum() / units["step"].nunique()),
                 "steps": int(units["step"].nunique())}
    total = decay_rate(units, "grad_ratio")
    out["total_rate"] = total.as_dict()
    if "direct_ratio" in units and units["direct_ratio"].notna().any():
        direct = decay_rate(units, "direct_ratio")
        out["direct_rate"] = direct.as_dict()
        # eq. (8) gives log(lambda) per unit when f and h are identities; the identity-path
        # reference (ref) measures what f and the projections add, so the prediction is the sum.
        ref = decay_rate(units, "ref_ratio")
        out["ref_rate"] = ref.as_dict()
        if math.isfinite(pred):
            expected = pred + (ref.slope if math.isfinite(ref.slope) else 0.0)
            out["predicted_direct_rate_with_f"] = expected
            out["direct_matches_prediction"] = bool(abs(direct.slope - expected) <= tol * max(1.0, abs(expected))
                                                    or direct.contains(expected))
        joined = predict_direct(units)
        body = joined[~joined["is_top"]]
        exact = body["pred_basis"] == "closed form"
        # only the closed-form predictions (eq. 5 and 8) are exact claims
        ratio = body.loc[exact, "direct_vs_pred"].replace([np.inf, -np.inf], np.nan).dropna()
        approx = body.loc[body["pred_basis"] == "mean-field product", "direct_vs_pred"].dropna()
        if len(approx):
            out["direct_vs_meanfield_median"] = float(approx.median())
        out["direct_vs_pred_median"] = float(ratio.median()) if len(ratio) else float("nan")
        out["direct_vs_pred_max_error"] = float((ratio - 1).abs().max()) if len(ratio) else float("nan")
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
    keep = [c for c in ("name", "stage", "x_shape", "kind", "pred_basis") if c in body]
    meta = body.groupby("unit")[keep].first()
    return meta.join(num.drop(columns=[c for c in ("stage", "step") if c in num]), how="left").reset_index()
