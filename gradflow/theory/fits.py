"""Fitted rates across depth, with confidence intervals and the fit's quality.

Norms in different stages hold different element counts and pass projections,
so every fit has one intercept per input shape (per stage, with a stage's
downsampling unit counted with the stage it reads from) and one common slope
(docs/theory.md, section 6): it compares units whose inputs hold the same elements.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd


@dataclass
class Fit:
    """slope per unit, its 95% confidence interval, R^2 and the number of points."""

    slope: float
    ci_low: float
    ci_high: float
    r2: float
    n: int
    stderr: float

    def as_dict(self) -> dict:
        return asdict(self)

    def contains(self, value: float) -> bool:
        return bool(self.ci_low <= value <= self.ci_high)


def fit_slope(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None,
              level: float = 0.95) -> Fit:
    """Least squares y ~ intercept per group + slope * x, with a t-based confidence interval.

    The interval assumes independent residuals. Along depth they are not (a
    gradient profile's residuals are strongly autocorrelated), and there the
    interval measures lack of fit, not uncertainty: for profiles across depth
    :func:`gradflow.theory.profile.profile_fits` bootstraps over samples instead.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    groups = np.zeros(len(x)) if groups is None else np.asarray(groups)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y, groups = x[ok], y[ok], groups[ok]
    levels = np.unique(groups)
    X = np.column_stack([x] + [(groups == g).astype(float) for g in levels])
    n, p = X.shape
    if n <= p:
        return Fit(float("nan"), float("nan"), float("nan"), float("nan"), int(n), float("nan"))
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    dof = n - p
    sigma2 = float(resid @ resid) / dof
    cov = sigma2 * np.linalg.pinv(X.T @ X)
    se = float(np.sqrt(max(cov[0, 0], 0.0)))
    from scipy.special import stdtrit  # the Student-t quantile, without importing scipy.stats (~0.5 s)
    t = float(stdtrit(dof, 0.5 + level / 2))
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(resid @ resid) / ss_tot if ss_tot > 0 else 1.0
    slope = float(coef[0])
    return Fit(slope, slope - t * se, slope + t * se, r2, int(n), se)


def decay_rate(units: pd.DataFrame, column: str = "grad_ratio") -> Fit:
    """Change of log(column) per unit going from the output toward the input.

    Positive: the quantity grows toward the input; for the direct term of a
    constant-scaling net the prediction is log(lambda) (negative for lambda < 1).
    Uses the batch mean of the per-sample ratios, per step. The interval is
    :func:`fit_slope`'s (independent residuals): quote
    :func:`gradflow.theory.profile.profile_fits`' bootstrap interval instead.
    """
    body = units[~units["is_top"]] if "is_top" in units else units
    body = body[np.isfinite(body[column]) & (body[column] > 0)]
    L = units["unit"].max()
    return fit_slope((L - body["unit"]).to_numpy(), np.log(body[column].to_numpy()), shape_groups(body))


def variance_growth(units: pd.DataFrame) -> dict:
    """Var(x_l) against l: linear fit and log-linear fit (per-stage intercepts), and which fits better.

    docs/theory.md, section 6: BN pre-activation nets grow roughly linearly in l,
    unnormalised nets with He init roughly double per unit (log slope log 2);
    projection shortcuts reset the growth (hence per-stage intercepts).
    """
    body = units[~units["is_top"]] if "is_top" in units else units
    body = body[np.isfinite(body["x_var"]) & (body["x_var"] > 0)]
    groups = shape_groups(body)
    lin = fit_slope(body["unit"].to_numpy(), body["x_var"].to_numpy(), groups)
    log = fit_slope(body["unit"].to_numpy(), np.log(body["x_var"].to_numpy()), groups)
    better = "linear" if lin.r2 >= log.r2 else "exponential"
    return {"linear": lin.as_dict(), "log": log.as_dict(), "better_fit": better,
            "factor_per_unit": float(np.exp(log.slope)),
            "doubling_per_unit": bool(log.contains(np.log(2.0)))}


def shape_groups(body: pd.DataFrame) -> np.ndarray:
    """One label per row: the unit's input shape (its stage where no shape is recorded) and step.

    The one grouping every fit and figure uses: units whose inputs hold the same
    elements, a downsampling unit counted with the stage it reads from.

    Args:
        body: unit rows with ``x_shape`` (or ``stage``) and, optionally, ``step``.
    Returns:
        An array of strings, one per row, equal for rows of the same group.
    """
    key = body["x_shape"] if "x_shape" in body else body["stage"]
    step = body["step"].astype(str) if "step" in body else "0"
    return (key.astype(str) + "/" + step).to_numpy()
