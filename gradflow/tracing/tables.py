"""From raw per-sample reductions of one step to the tidy tables, vectorised.

Hooks only reduce tensors on the device (norms and means, shape [B]); every
derived number (ratios, cosines, variances, quantiles) is computed here, once
per step, in float64 on the host.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

# Raw per-sample reductions a hook may record, shape [B] each.
RAW = ("x_norm", "x_mean", "h_norm", "r_norm", "coef", "grad_norm", "direct_norm",
       "residual_norm", "dot_direct_residual", "ref_norm", "direct_log_scale", "ref_log_scale")
# Per-sample quantities of the tables (raw and derived), in column order.
QUANTITIES = ("x_norm", "x_rms", "x_mean", "h_norm", "r_norm", "coef", "grad_norm", "grad_ratio",
              "direct_norm", "direct_ratio", "ref_ratio", "residual_norm", "cos_direct_residual",
              "cancel")
SUMMARIES = ("std", "q05", "q50", "q95")


def derive(raw: dict[str, np.ndarray], numel: np.ndarray, top: np.ndarray | None,
           cancel_tol: float) -> dict[str, np.ndarray]:
    """All per-sample quantities, [units, B], from the raw reductions and dE/dx_L's norms ``top``."""
    q = dict(raw)
    n, B = next(iter(raw.values())).shape
    nan = np.full((n, B), np.nan)
    if "x_norm" in q:
        q["x_rms"] = q["x_norm"] / np.sqrt(numel)[:, None]
    if top is not None and "grad_norm" in q:
        q["grad_ratio"] = q["grad_norm"] / top
    if "direct_norm" in q:
        # the direct and reference vectors are carried scaled by exp(-log_scale)
        scale = np.exp(q.pop("direct_log_scale", np.zeros((n, B))))
        q["direct_norm"] = q["direct_norm"] * scale
        if "dot_direct_residual" in q:
            q["dot_direct_residual"] = q["dot_direct_residual"] * scale
        if "ref_norm" in q:
            q["ref_norm"] = q["ref_norm"] * np.exp(q.pop("ref_log_scale", np.zeros((n, B))))
        g, d, r = q["grad_norm"], q["direct_norm"], q.get("residual_norm", nan)
        if top is not None:
            q["direct_ratio"] = d / top
            q["ref_ratio"] = q.get("ref_norm", nan) / top
        with np.errstate(divide="ignore", invalid="ignore"):
            q["cos_direct_residual"] = np.clip(q.get("dot_direct_residual", nan) / (d * r), -1.0, 1.0)
        q["cancel"] = np.where(np.isnan(d), np.nan, (g < cancel_tol * d).astype(float))
    q.pop("ref_norm", None)
    q.pop("dot_direct_residual", None)
    return q


def step_tables(step: int, meta: list[dict], q: dict[str, np.ndarray]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(units table, samples table) of one step: meta gives one dict per unit row."""
    n = len(meta)
    B = next(iter(q.values())).shape[1]
    units = pd.DataFrame(meta)
    units.insert(0, "step", step)
    units["batch"] = B
    if "x_rms" in q:  # Var over every element of the batch (equal counts per sample)
        units["x_var"] = np.mean(q["x_rms"] ** 2, axis=1) - np.mean(q["x_mean"], axis=1) ** 2
    cols = {}
    for name in QUANTITIES:
        if name not in q:
            continue
        v = q[name]
        with np.errstate(invalid="ignore"), _quiet():
            if name == "cancel":
                cols["cancel_frac"] = np.mean(v, axis=1)
                continue
            cols[name] = np.mean(v, axis=1)
            cols[name + "_std"] = np.std(v, axis=1)
            qs = np.quantile(v, [0.05, 0.5, 0.95], axis=1)
        cols[name + "_q05"], cols[name + "_q50"], cols[name + "_q95"] = qs
    units = pd.concat([units, pd.DataFrame(cols)], axis=1)
    samples = pd.DataFrame({"step": step, "unit": np.repeat(units["unit"].to_numpy(), B),
                            "sample": np.tile(np.arange(B), n)})
    for name in QUANTITIES:
        if name in q:
            samples[name] = q[name].ravel()
    return units, samples


class _quiet:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)
