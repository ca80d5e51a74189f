"""Robust gradient ratios: ratio of batch medians, and the samples that would drive a mean.

docs/theory.md, section 5. The tracer's ``grad_ratio`` is the batch mean of
per-sample ratios ||dE/dx_l||_i / ||dE/dx_L||_i. A sample whose softmax is
saturated has a tiny ||dE/dx_L||_i, and its ratio can exceed the others' by
orders of magnitude: three such samples of sixteen set the mean. The headline
ratio is therefore median_i ||dE/dx_l||_i / median_i ||dE/dx_L||_i, with the
mean beside it, and samples with a degenerate ||dE/dx_L|| are counted and named.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

DEGENERATE = 1e-3   # ||dE/dx_L||_i below this times the batch median: a saturated softmax


def median_ratios(units: pd.DataFrame) -> pd.DataFrame:
    """Add ``grad_ratio_med``, ``direct_ratio_med`` (ratio of batch medians) and ``grad_ratio_rms``.

    ``grad_ratio_rms`` is the ratio of the batch's root-mean-square norms,
    sqrt(mean_i ||dE/dx_l||_i^2) / sqrt(mean_i ||dE/dx_L||_i^2): the whole-batch
    norm ratio an isotropy prediction is about. Per step, from the per-unit
    quantiles and spreads the tracer records.
    """
    out = []
    for _, df in units.groupby("step", sort=True):
        df = df.copy()
        top = df[df["is_top"].astype(bool)]
        if top.empty or "grad_norm_q50" not in df:
            out.append(df)
            continue
        t = top.iloc[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            df["grad_ratio_med"] = df["grad_norm_q50"] / t["grad_norm_q50"]
            if "direct_norm_q50" in df:
                df["direct_ratio_med"] = df["direct_norm_q50"] / t["grad_norm_q50"]
            if "grad_norm_std" in df:
                rms = np.sqrt(df["grad_norm"] ** 2 + df["grad_norm_std"] ** 2)
                df["grad_ratio_rms"] = rms / float(np.sqrt(t["grad_norm"] ** 2 + t["grad_norm_std"] ** 2))
        out.append(df)
    return pd.concat(out) if out else units.copy()


def degenerate_samples(samples: pd.DataFrame, units: pd.DataFrame, tol: float = DEGENERATE) -> list[dict]:
    """Samples whose ||dE/dx_L|| is below ``tol`` times their batch's median (saturated softmax).

    Returns:
        One dict per such sample: ``step``, ``sample``, ``top_norm``, ``batch_median``
        and ``max_ratio`` (its largest per-sample ||dE/dx_l|| / ||dE/dx_L||).
    """
    if samples is None or samples.empty or "grad_norm" not in samples:
        return []
    top_unit = units.loc[units["is_top"].astype(bool), ["step", "unit"]]
    out = []
    for step, unit in top_unit.itertuples(index=False):
        s = samples[samples["step"] == step]
        top = s[s["unit"] == unit].set_index("sample")["grad_norm"]
        if top.empty:
            continue
        med = float(top.median())
        bad = top[top < tol * med]
        for i, v in bad.items():
            ratio = s.loc[s["sample"] == i, "grad_ratio"] if "grad_ratio" in s else pd.Series(dtype=float)
            out.append(dict(step=int(step), sample=int(i), top_norm=float(v), batch_median=med,
                            max_ratio=float(ratio.max()) if len(ratio) else float("nan")))
    return out


def batch_size(samples: pd.DataFrame) -> int:
    """The number of (step, sample) pairs in a samples table."""
    if samples is None or samples.empty:
        return 0
    return int(samples[["step", "sample"]].drop_duplicates().shape[0])
