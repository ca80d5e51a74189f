"""Eq. (5)/(8) for the direct term, only where the paper's assumptions hold (docs/theory.md, section 2).

Pure functions of a units table (``Tracer.units``): no hooks, no plotting.

Eq. (5): with h and f the identity, the direct term of dE/dx_l is dE/dx_L.
Eq. (8): with h(x_i) = lambda_i x_i and f the identity it is
prod_{i=l}^{L-1} lambda_i dE/dx_L. A unit is *covered* when its shortcut is a
plain scalar multiple (``h_plain`` and a closed-form ``scalar_coef``) and no
activation follows its addition (``f_identity``); the probe records both
columns. A run of consecutive covered units is predicted from the closed form
alone, anchored at the first unit above the run: x_L (ratio 1: the prediction
is exactly prod lambda) or an uncovered unit (a projection, an activation
after the addition, a gate), whose measured direct term is the anchor. No
measured chain through ReLU masks or LayerNorms enters the prediction.

The direct term the tracer measures obeys these equations exactly wherever
they apply (that is how the split is defined): ``direct_vs_pred`` checks the
split, it is not a test of the theory, and the report says so once.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

COVERED = ("eq. (5)", "eq. (8)")
NOT_F = "not covered: eq. (5)/(8) need f = identity, and an activation follows the addition"
NOT_H = "not covered: the shortcut is a projection (a convolution or padding), not a scalar multiple"
NOT_COEF = "not covered: h's coefficient depends on the data (gate, dropout, 1x1 conv): no closed form"
UNKNOWN = "not covered: the table does not record whether f is the identity (no f_identity column)"


def coverage(body: pd.DataFrame) -> pd.Series:
    """Per unit row: "eq. (5)", "eq. (8)" or the reason eq. (5)/(8) do not cover it."""
    coef = body["scalar_coef"].astype(float) if "scalar_coef" in body else pd.Series(np.nan, index=body.index)
    if "f_identity" not in body:
        return pd.Series(UNKNOWN, index=body.index)
    f_id = body["f_identity"].astype(float) == 1.0
    h_plain = body["h_plain"].astype(float) == 1.0 if "h_plain" in body else pd.Series(True, index=body.index)
    out = pd.Series(np.where(coef == 1.0, COVERED[0], COVERED[1]), index=body.index, dtype=object)
    out[~coef.notna()] = NOT_COEF
    out[~h_plain] = NOT_H
    out[~f_id] = NOT_F
    return out


def predict_direct(units: pd.DataFrame) -> pd.DataFrame:
    """Add ``pred_basis``, ``pred_direct_factor``, ``pred_anchor``, ``pred_direct_ratio``, ``direct_vs_pred``.

    ``pred_direct_factor`` is prod lambda_i from the unit to its anchor (NaN
    where not covered); ``pred_anchor`` the unit whose direct term anchors it
    (-1: x_L); ``pred_direct_ratio`` = factor x the anchor's direct ratio (1
    at x_L), i.e. eq. (5)/(8) relative to ||dE/dx_L||.

    Args:
        units: a units table with the split (``tr.units``): ``direct_ratio``, ``scalar_coef`` and,
            where recorded, ``h_plain`` and ``f_identity``.
    Returns:
        A copy with the columns above, per unit and step.
    """
    out = []
    for _, df in units.groupby("step", sort=True):
        df = df.sort_values("unit").copy()
        top = df["is_top"].astype(bool)
        body = df[~top]
        basis = coverage(body)
        lam = body["scalar_coef"].astype(float).to_numpy() if "scalar_coef" in body else np.full(len(body), np.nan)
        direct = body["direct_ratio"].to_numpy(float) if "direct_ratio" in body else np.full(len(body), np.nan)
        covered = basis.isin(COVERED).to_numpy()
        factor = np.full(len(body), np.nan)
        anchor = np.full(len(body), np.nan)
        pred = np.full(len(body), np.nan)
        run, anchor_unit, anchor_val = 1.0, -1, 1.0
        units_idx = body["unit"].to_numpy()
        for i in range(len(body) - 1, -1, -1):     # from the output toward the input
            if covered[i]:
                run *= lam[i]
                factor[i], anchor[i], pred[i] = run, anchor_unit, run * anchor_val
            else:                                  # a new run starts below this unit
                run, anchor_unit, anchor_val = 1.0, int(units_idx[i]), direct[i]
        df.loc[body.index, "pred_basis"] = basis
        df.loc[body.index, "pred_direct_factor"] = factor
        df.loc[body.index, "pred_anchor"] = anchor
        df.loc[body.index, "pred_direct_ratio"] = pred
        df.loc[top, "pred_basis"] = "x_L"
        df.loc[top, ["pred_direct_factor", "pred_direct_ratio"]] = 1.0
        if "direct_ratio" in df:
            with np.errstate(divide="ignore", invalid="ignore"):
                df["direct_vs_pred"] = df["direct_ratio"] / df["pred_direct_ratio"]
        out.append(df)
    return pd.concat(out) if out else units.copy()


def predicted_rate(units: pd.DataFrame) -> float:
    """Eq. (8)'s change of log ||direct term|| per unit toward the input: log(lambda) (0: eq. 5).

    Over the covered units (:func:`coverage`); NaN where none is covered or their lambdas differ.
    """
    body = units[~units["is_top"].astype(bool)]
    body = body[coverage(body).isin(COVERED)]
    coefs = body["scalar_coef"].astype(float).unique()
    if len(coefs) != 1:
        return float("nan")
    return float(np.log(coefs[0])) if coefs[0] > 0 else float("-inf")
