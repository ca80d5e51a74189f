"""The paper's predictions for the direct term, joined to recorded tables.

Pure functions of a units table (``Tracer.units``): no hooks, no plotting.

Eq. (5): with identity shortcuts and identity after-addition activations, the
direct term of dE/dx_l is dE/dx_L itself. Eq. (8): with h(x_i) = lambda_i x_i it
is prod_{i=l}^{L-1} lambda_i dE/dx_L. Across downsampling units, "dE/dx_L" means
dE/dx_L carried back through the projection shortcuts: the tracer's ``ref``
chain (every h-coefficient set to 1), so the prediction is
``prod(lambda_i) * ref_ratio``, exact whatever the projections and f are.
Where the coefficient depends on the data (gates), the product of the measured
per-unit batch-mean coefficients stands in for prod(lambda): an approximation
(basis "mean-field product"), since the gates act element by element and the
measured direct term multiplies them element-wise. For dropout and 1x1-conv
shortcuts the factor sits inside h and has no closed form (basis "none").
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def predict_direct(units: pd.DataFrame) -> pd.DataFrame:
    """Add ``pred_direct_ratio``, ``direct_vs_pred`` and ``pred_basis`` per unit and step.

    Args:
        units: a units table with the split (``tr.units``): ``ref_ratio``,
            ``scalar_coef`` and, for gates, ``coef``.
    Returns:
        A copy with ``pred_direct_ratio`` = prod(lambda_i) x ``ref_ratio`` (eq. 8;
        the measured mean gate values where the factor depends on the data),
        ``direct_vs_pred`` (measured over predicted) and ``pred_basis``
        (``closed form``, ``mean-field product`` or ``none``).
    """
    out = []
    for _, df in units.groupby("step", sort=True):
        df = df.sort_values("unit").copy()
        body = df[~df["is_top"]]
        closed = body["scalar_coef"].astype(float)
        measured = body["coef"] if "coef" in body else pd.Series(np.nan, index=body.index)
        factor = closed.where(closed.notna(), measured)
        # product over i >= l: reverse cumulative product
        prod = factor[::-1].cumprod()[::-1]
        basis = np.where(closed[::-1].isna().cumsum()[::-1] == 0, "closed form",
                         np.where(factor[::-1].isna().cumsum()[::-1] == 0, "mean-field product", "none"))
        pred = prod * body["ref_ratio"] if "ref_ratio" in body else prod * np.nan
        df.loc[body.index, "pred_direct_factor"] = prod
        df.loc[body.index, "pred_direct_ratio"] = pred
        df.loc[body.index, "pred_basis"] = basis
        df.loc[df["is_top"], ["pred_direct_factor", "pred_direct_ratio"]] = 1.0
        df.loc[df["is_top"], "pred_basis"] = "closed form"
        if "direct_ratio" in df:
            df["direct_vs_pred"] = df["direct_ratio"] / df["pred_direct_ratio"]
        out.append(df)
    return pd.concat(out) if out else units.copy()


def predicted_rate(units: pd.DataFrame) -> float:
    """Predicted change of log ||direct term|| per unit toward the input: log(lambda), 0 for identity.

    NaN where the units' coefficients are not one common closed-form scalar.
    """
    body = units[~units["is_top"]]
    coefs = body["scalar_coef"].astype(float).dropna().unique()
    if len(coefs) != 1 or body["scalar_coef"].isna().any():
        return float("nan")
    return float(np.log(coefs[0])) if coefs[0] > 0 else float("-inf")
