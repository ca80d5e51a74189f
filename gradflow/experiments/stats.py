"""Rank statistics for claims about orderings: rank correlations, the exact permutation test of
"k of n pairs in the paper's order", and bootstrap intervals.

Pure numpy (scipy.stats is not imported: ~0.5 s, and these run inside bootstrap loops); the tests
check every function against scipy.stats on the same data.

The ordering test: the paper orders m rows (ties allowed: two "fail" rows are not a pair); here
each row has a measured error. The statistic is the number of pairs the paper tells apart whose
order holds here. Its null distribution is that of the same count when the measured errors are
assigned to the rows at random (every permutation equally likely): with no ties on either side it
is the Mahonian distribution (permutations of m items by number of inversions), e.g. for m = 5,
P(at least 9 of 10 pairs) = 5/120 = 0.042 and P(at least 7 of 10) = 29/120 = 0.24.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import numpy as np

EXACT_LIMIT = 40_320   # 8!: permutations enumerated exactly up to this many, sampled beyond


def rankdata(a: Sequence[float]) -> np.ndarray:
    """Average ranks (1..n; tied values share the mean of their ranks), as scipy.stats.rankdata.

    ``inf`` ranks last (the paper's "fail" rows tie there); NaN is refused: drop it first.
    """
    a = np.asarray(a, float)
    if np.isnan(a).any():
        raise ValueError("rankdata: NaN in the data; drop the missing values first")
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    new = np.r_[True, s[1:] != s[:-1]] if len(s) else np.zeros(0, bool)   # first of each run of ties
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(s)]
    ranks = np.empty(len(a))
    ranks[order] = ((starts + ends - 1) / 2 + 1)[np.cumsum(new) - 1]
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks (NaN if either side is constant)."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / den if den > 0 else float("nan")


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties on either side corrected for), as scipy.stats.kendalltau's default."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    with np.errstate(invalid="ignore"):       # inf - inf (two "fail" rows): NaN, a tie below
        sx = np.sign(x[:, None] - x[None, :])
        sy = np.sign(y[:, None] - y[None, :])
    sx[np.isnan(sx)] = 0                      # inf - inf: a tie
    sy[np.isnan(sy)] = 0
    iu = np.triu_indices(len(x), 1)
    sx, sy = sx[iu], sy[iu]
    den = math.sqrt(float((sx != 0).sum()) * float((sy != 0).sum()))
    return float((sx * sy).sum()) / den if den > 0 else float("nan")


def concordant_pairs(paper: Sequence[float], here: Sequence[float]) -> tuple[int, int, int]:
    """Over the pairs the paper tells apart (paper values differ): (kept, reversed, tied) here."""
    p, h = np.asarray(paper, float), np.asarray(here, float)
    kept = rev = tied = 0
    for i, j in itertools.combinations(range(len(p)), 2):
        if p[i] == p[j]:
            continue
        a, b = (i, j) if p[i] < p[j] else (j, i)
        d = h[b] - h[a]
        if d > 0:
            kept += 1
        elif d < 0:
            rev += 1
        else:
            tied += 1
    return kept, rev, tied


def ordering_pvalue(paper: Sequence[float], here: Sequence[float], samples: int = 20_000,
                    seed: int = 0) -> tuple[float, str]:
    """P(at least the observed number of kept pairs) when ``here`` is assigned to the rows at random.

    Exact (every permutation) for up to 8 rows; otherwise ``samples`` random permutations, with
    the observed one counted in (p = (1 + hits) / (1 + samples), never 0). A tied pair counts as
    half kept. Returns (p, "exact" or "sampled from N permutations").
    """
    p, h = np.asarray(paper, float), np.asarray(here, float)
    n = len(p)
    iu = np.triu_indices(n, 1)
    with np.errstate(invalid="ignore"):
        dp = np.sign(p[iu[1]] - p[iu[0]])
    dp[np.isnan(dp)] = 0
    use = dp != 0

    def scores(hh: np.ndarray) -> np.ndarray:       # hh: [permutations, n]
        with np.errstate(invalid="ignore"):
            dh = np.sign(hh[:, iu[1]] - hh[:, iu[0]])
        agree = dp[use] * dh[:, use]
        return (agree > 0).sum(1) + 0.5 * (agree == 0).sum(1)

    obs = float(scores(h[None])[0])
    if math.factorial(n) <= EXACT_LIMIT:
        perms = np.array(list(itertools.permutations(range(n))), dtype=np.int64).reshape(-1, n)
        return float((scores(h[perms]) >= obs - 1e-9).mean()), "exact"
    rng = np.random.default_rng(seed)
    hits, left = 0, samples
    while left:
        k = min(left, 10_000)
        perms = rng.permuted(np.tile(np.arange(n), (k, 1)), axis=1)
        hits += int((scores(h[perms]) >= obs - 1e-9).sum())
        left -= k
    return (1 + hits) / (1 + samples), f"sampled from {samples:,} permutations"


def mahonian(n: int) -> np.ndarray:
    """Number of permutations of n items with k inversions, k = 0..n(n-1)/2 (the null of the count)."""
    counts = np.ones(1, dtype=object)
    for m in range(2, n + 1):
        new = np.zeros(len(counts) + m - 1, dtype=object)
        for shift in range(m):
            new[shift:shift + len(counts)] += counts
        counts = new
    return counts


def percentile_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The bootstrap percentile interval of ``values`` (NaN replicates left out; NaN if none)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan"), float("nan")
    lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def one_sided_pvalue(observed: float, null: Optional[np.ndarray]) -> float:
    """(1 + #null >= observed) / (1 + len(null)): a permutation p-value that is never 0."""
    if null is None or not len(null):
        return float("nan")
    return float((1 + (np.asarray(null) >= observed - 1e-12).sum()) / (1 + len(null)))
