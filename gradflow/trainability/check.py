"""Predict, then check: rank correlations of each predictor with a training outcome, with bootstrap
intervals, a permutation p-value, a verdict per predictor, and which one ranks best.

Each predictor's direction is fixed in :data:`gradflow.trainability.predictors.PREDICTORS` before
any outcome is seen; ``score = sign * value`` is then "predicted badness", and a predictor that
works has a positive rank correlation between its score and the test error. Per variant the
predictor is the median over its init seeds and the outcome the median over its training seeds
(the paper: its one reported error, "fail" tied at the worst rank).

Bootstrap (``replicates``): redraw the variants with replacement, and within each variant its init
seeds and its training seeds; recompute both medians and the correlations. The interval is the 2.5
and 97.5 percentiles. Verdict: ``predicts`` if Spearman's interval lies above 0, ``fails (wrong
way)`` if it lies below 0, ``fails (not distinguishable from no relation)`` otherwise. ``p_best``:
the share of replicates in which the predictor has the highest Spearman of all.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from gradflow.experiments.stats import kendall_tau_b, one_sided_pvalue, percentile_interval, spearman
from gradflow.trainability.predictors import BY_NAME, PREDICTORS

COLUMNS = ("outcome", "predictor", "variants", "spearman", "spearman_low", "spearman_high", "kendall",
           "kendall_low", "kendall_high", "p_permutation", "p_best", "verdict")


def _medians(values: dict, keys: list, rng: Optional[np.random.Generator]) -> np.ndarray:
    out = []
    for k in keys:
        v = np.asarray(values[k], float)
        if rng is not None and len(v) > 1:
            v = v[rng.integers(0, len(v), len(v))]
        out.append(float(np.median(v)))
    return np.array(out)


def _verdict(lo: float, hi: float) -> str:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "not tested (too few variants)"
    if lo > 0:
        return "predicts"
    if hi < 0:
        return "fails (wrong way)"
    return "fails (not distinguishable from no relation)"


def rank_check(predictors: pd.DataFrame, outcome: dict, name: str, replicates: int = 2000,
               seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """Rank correlations of every predictor with one outcome.

    Args:
        predictors: one row per (variant, seed): ``variant``, ``seed`` and one column per predictor.
        outcome: {variant: [test error %, one per training seed]} (the paper: one value; inf = "fail").
        name: the outcome's name in the table ("laptop", "paper").
        replicates: bootstrap replicates.
        seed: the bootstrap's seed.
    Returns:
        (one row per predictor with :data:`COLUMNS`, notes on variants left out).
    """
    notes = []
    rng = np.random.default_rng(seed)
    names = [p.name for p in PREDICTORS if p.name in predictors]
    vals = {n: {v: [BY_NAME[n].sign * x for x in g[n].to_numpy(float)] for v, g in predictors.groupby("variant")}
            for n in names}
    common = [v for v in dict.fromkeys(predictors["variant"]) if v in outcome and len(outcome[v])]
    missing = [v for v in dict.fromkeys(predictors["variant"]) if v not in common]
    if missing:
        notes.append(f"{name}: no outcome for {len(missing)} variant(s), left out: {', '.join(missing)}")
    keys = {}
    for n in names:
        ok = [v for v in common if not np.isnan(_medians(vals[n], [v], None)[0])]
        if len(ok) < len(common):
            notes.append(f"{name}/{n}: no value for {', '.join(sorted(set(common) - set(ok)))} (left out)")
        keys[n] = ok
    point = {}
    for n in names:
        s, y = _medians(vals[n], keys[n], None), _medians(outcome, keys[n], None)
        point[n] = (spearman(s, y), kendall_tau_b(s, y), s, y)
    boots = {n: ([], []) for n in names}
    best = {n: 0 for n in names}
    for _ in range(replicates):
        rhos = {}
        for n in names:
            k = keys[n]
            if len(k) < 3:
                continue
            pick = [k[i] for i in rng.integers(0, len(k), len(k))]
            s, y = _medians(vals[n], pick, rng), _medians(outcome, pick, rng)
            rhos[n] = spearman(s, y)
            boots[n][0].append(rhos[n])
            boots[n][1].append(kendall_tau_b(s, y))
        finite = {n: r for n, r in rhos.items() if np.isfinite(r)}
        if finite:
            best[max(finite, key=finite.get)] += 1
    rows = []
    for n in names:
        rho, tau, s, y = point[n]
        lo, hi = percentile_interval(boots[n][0])
        klo, khi = percentile_interval(boots[n][1])
        perm = np.array([spearman(s, rng.permutation(y)) for _ in range(min(replicates, 2000))]) \
            if len(s) >= 3 else np.array([])
        p = one_sided_pvalue(rho, perm) if np.isfinite(rho) else float("nan")
        rows.append(dict(outcome=name, predictor=n, variants=len(keys[n]), spearman=rho, spearman_low=lo,
                         spearman_high=hi, kendall=tau, kendall_low=klo, kendall_high=khi, p_permutation=p,
                         p_best=best[n] / replicates if replicates else float("nan"), verdict=_verdict(lo, hi)))
    return pd.DataFrame(rows, columns=list(COLUMNS)), notes


def best_predictor(table: pd.DataFrame, outcome: str) -> Optional[str]:
    """The predictor with the highest Spearman for ``outcome`` among those whose verdict is "predicts"."""
    t = table[(table["outcome"] == outcome) & (table["verdict"] == "predicts")]
    return None if t.empty else str(t.sort_values("spearman", ascending=False)["predictor"].iloc[0])
