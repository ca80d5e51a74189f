"""Tables researchers quote about paths: path-length counts, the effective range, Veit beside exact.

* :func:`path_counts`: the Binomial(n, 1/2) distribution of path lengths;
* :func:`effective_range`: the shortest window of lengths holding 90% of the gradient, and its peak;
* :func:`compare_table`: per length, counts, the exact split and Veit's sampled estimate;
* :func:`probe_paths` / :func:`format_probe_paths`: ``python -m gradflow.probe --paths``.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd

from gradflow.errors import GradflowError
from gradflow.tracing.paths.carrier import n_paths


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


# --- counts and ranges -----------------------------------------------------------------------

def path_counts(n: int) -> pd.DataFrame:
    """The path-length distribution of n units: k, C(n, k) and its share of the 2^n paths."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise GradflowError(f"n={n!r} must be a number of units (int >= 0)")
    log2n = n * math.log(2)
    return pd.DataFrame([dict(k=k, n_paths=n_paths(n, k, None), share=math.exp(_log_comb(n, k) - log2n))
                         for k in range(n + 1)])


def effective_range(table: pd.DataFrame, unit: Optional[int] = None, mass: float = 0.9,
                    column: str = "norm") -> dict:
    """The shortest window of path lengths [lo, hi] holding ``mass`` of the gradient, and its peak.

    Args:
        table: :attr:`PathResult.table` (or :func:`sample_paths`' table with
            ``column="total"``, Veit's Fig. 6c measure).
        unit: which unit's row set (default: the first unit, the whole network's paths).
        mass: the share of sum_k ``column`` the window must hold.
    Returns:
        dict(lo, hi, peak, mass, held, path_share, truncated): ``held`` is the share
        the window holds, ``path_share`` the share of all 2^n paths whose length
        lies in it, ``truncated`` that the remainder beyond max_len holds more
        than 1 - mass (the window is then not known).
    """
    if not 0 < mass <= 1:
        raise GradflowError(f"mass={mass!r} must be in (0, 1]; 0.9 is the usual choice")
    t = table
    if "unit" in t.columns:
        unit = int(t["unit"].min()) if unit is None else unit
        t = t[t["unit"] == unit]
        if t.empty:
            raise GradflowError(f"unit={unit!r} is not in the table; units are {sorted(table['unit'].unique())}")
    rem = float(t.loc[t["k"] < 0, column].sum())
    t = t[t["k"] >= 0].sort_values("k")
    ks, w = t["k"].to_numpy(), t[column].to_numpy(dtype=float)
    total = w.sum() + rem
    best = (0, len(ks) - 1)
    csum = np.concatenate([[0.0], np.cumsum(w)])
    j = 0
    for i in range(len(ks)):        # two pointers: the shortest [i, j] with enough mass
        j = max(j, i)
        while j < len(ks) and csum[j + 1] - csum[i] < mass * total:
            j += 1
        if j < len(ks) and (j - i) < (best[1] - best[0]):
            best = (i, j)
    lo, hi = int(ks[best[0]]), int(ks[best[1]])
    n = int(t["n_units"].iloc[0]) if "n_units" in t.columns else len(ks) - 1 if rem == 0 else None
    held = (csum[best[1] + 1] - csum[best[0]]) / total if total > 0 else float("nan")
    path_share = None
    if n is not None:
        path_share = sum(math.exp(_log_comb(n, k) - n * math.log(2)) for k in range(lo, hi + 1))
    return dict(lo=lo, hi=hi, peak=int(ks[int(np.argmax(w))]), mass=mass, held=float(held),
                path_share=path_share, truncated=bool(rem > (1 - mass) * total))


def compare_table(exact: pd.DataFrame, sampled: Optional[pd.DataFrame] = None, unit: Optional[int] = None) -> pd.DataFrame:
    """One row per path length at one unit (default: the first): counts, exact split and Veit's estimate.

    Columns: k, n_paths, path_share (C(n,k)/2^n), norm, share, proj (exact, see :class:`PathResult`)
    and, with ``sampled``, Veit's path_norm, path_norm_std, total and unbiased_norm.
    """
    unit = int(exact["unit"].min()) if unit is None else unit
    t = exact[(exact["unit"] == unit) & (exact["k"] >= 0)].copy()
    n = int(t["n_units"].iloc[0])
    t["path_share"] = [math.exp(_log_comb(n, k) - n * math.log(2)) for k in t["k"]]
    cols = ["k", "n_paths", "path_share", "norm", "norm_q05", "norm_q95", "share", "proj"]
    t = t[cols]
    if sampled is not None:
        t = t.merge(sampled[["k", "samples", "path_norm", "path_norm_std", "total", "unbiased_norm"]],
                    on="k", how="left")
    return t.reset_index(drop=True)
