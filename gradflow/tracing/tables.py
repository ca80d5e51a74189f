"""From a step's device reductions to the tidy tables, with one host transfer.

Hooks only reduce tensors on the device (norms and means, shape [B]; weight
quantities, one number per unit); every derived number (ratios, cosines,
variances, quantiles) is computed here, once per step, in float64 on the host.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

# Per-sample quantities of the built-in tables, in column order.
QUANTITIES = ("x_norm", "x_rms", "x_mean", "h_norm", "r_norm", "coef", "grad_norm", "grad_ratio",
              "direct_norm", "direct_ratio", "ref_ratio", "residual_norm", "cos_direct_residual",
              "cancel")
SUMMARIES = ("std", "q05", "q50", "q95")
# Raw reductions proportional to the loss's scale (AMP's GradScaler multiplies the loss).
GRAD_SCALED = ("grad_norm", "direct_norm", "residual_norm", "ref_norm")
GRAD_SCALED_SQ = ("dot_direct_residual",)


def to_host(rows: list[dict], scalars: list[dict]) -> tuple[dict, dict, int]:
    """Per-sample reductions ([rows, B] arrays by name) and one-number ones ([rows]), one transfer."""
    flat = [(i, k, t) for i, st in enumerate(rows) for k, t in st.items()]
    flat_s = [(i, k, t) for i, st in enumerate(scalars) for k, t in st.items()]
    if not flat and not flat_s:
        return {}, {}, 0
    parts = []
    B = flat[0][2].shape[0] if flat else 0
    if flat:
        parts.append(torch.stack([t.float() for _, _, t in flat]).flatten())
    if flat_s:
        dev = parts[0].device if parts else flat_s[0][2].device
        parts.append(torch.stack([t.detach().float().reshape(()).to(dev) for _, _, t in flat_s]))
    host = torch.cat(parts).to("cpu", torch.float64).numpy() if len(parts) > 1 else \
        parts[0].to("cpu", torch.float64).numpy()
    n = len(rows)
    raw: dict = {}
    for j, (i, k, _) in enumerate(flat):
        raw.setdefault(k, np.full((n, B), np.nan))[i] = host[j * B:(j + 1) * B]
    off = len(flat) * B
    sc: dict = {}
    for j, (i, k, _) in enumerate(flat_s):
        sc.setdefault(k, np.full(n, np.nan))[i] = host[off + j]
    return raw, sc, B


def unscale(raw: dict, rows: slice, scale: float) -> None:
    """Undo a GradScaler's loss scale on the gradient reductions of ``rows``."""
    for k in GRAD_SCALED:
        if k in raw:
            raw[k][rows] /= scale
    for k in GRAD_SCALED_SQ:
        if k in raw:
            raw[k][rows] /= scale * scale


def step_tables(meta: list[dict], q: dict[str, np.ndarray], columns=QUANTITIES,
                B: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(units table, samples table) of one set of rows: ``meta`` gives one dict per row."""
    n = len(meta)
    units = pd.DataFrame(meta)
    units["batch"] = B
    if "x_rms" in q:  # Var over every element of the batch (equal counts per sample)
        units["x_var"] = np.mean(q["x_rms"] ** 2, axis=1) - np.mean(q["x_mean"], axis=1) ** 2
    cols = {}
    for name in columns:
        if name not in q:
            continue
        v = q[name]
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if name == "cancel":
                cols["cancel_frac"] = np.mean(v, axis=1)
                continue
            cols[name] = np.mean(v, axis=1)
            cols[name + "_std"] = np.std(v, axis=1)
            qs = np.quantile(v, [0.05, 0.5, 0.95], axis=1)
        cols[name + "_q05"], cols[name + "_q50"], cols[name + "_q95"] = qs
    units = pd.concat([units, pd.DataFrame(cols, index=units.index)], axis=1)
    key = {c: np.repeat(units[c].to_numpy(), B) for c in ("step", "micro", "phase", "backward", "unit")
           if c in units}
    samples = pd.DataFrame({**key, "sample": np.tile(np.arange(B), n)})
    for name in columns:
        if name in q and name != "cancel" or name == "cancel" and "cancel" in q:
            samples[name] = q[name].ravel()
    return units, samples
