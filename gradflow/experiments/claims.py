"""An ordering claim with its uncertainty: how many of the paper's pairs hold, how likely that is
under a random ordering, and how stable it is over seeds and test images.

For one panel of rows (each with the paper's error and this sweep's runs):

- the statistic: pairs the paper tells apart whose order the rows' median errors keep (a tie
  counts as half in the test);
- p: the exact permutation test of that count (:func:`gradflow.experiments.stats.ordering_pvalue`):
  the chance that a random assignment of the measured medians to the rows keeps as many pairs;
- a bootstrap over seeds and test images: each replicate redraws every row's runs (with
  replacement) and, where the runs' per-image results are known, one common redraw of the test
  images (paired: every run was tested on the same images), recomputes each run's error, the
  medians and the count. It gives the count's 95% interval and, per pair, how often its order holds.
  Without per-image results only the seeds are redrawn, and the claim says so.

A row near chance (within 5 points of it) did not learn: its error is set to chance for the
ordering, so two such rows tie and never count as "in the paper's order".
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from gradflow.experiments.stats import concordant_pairs, ordering_pvalue, percentile_interval

NEAR_CHANCE = 5.0        # points below chance that still count as "did not learn"
ESTABLISHED = 0.975      # a pair's order holds in at least this share of bootstrap replicates


@dataclass
class RowRuns:
    """One row's finished runs: error per run (%, a diverged run at chance) and per-image results."""

    row: str
    paper: float                                   # the paper's error (inf: "fail")
    errors: list = field(default_factory=list)     # % per run
    correct: list = field(default_factory=list)    # per run: bool [images] or None
    chance: float = 90.0                           # % error of a network that learned nothing


@dataclass
class Claim:
    """The ordering of one panel, with its uncertainty."""

    rows: list
    kept: int
    reversed: int
    tied: int
    p_value: float
    p_method: str
    kept_interval: tuple
    pair_support: dict            # (better in the paper, worse in the paper) -> P(order holds here)
    pair_reversed: dict           # the same pairs -> P(order reversed here); the rest of 1 is P(tied)
    resampled: str                # what the bootstrap redrew
    replicates: int

    @property
    def pairs(self) -> int:
        return self.kept + self.reversed + self.tied

    def established(self) -> tuple[list, list, list]:
        """Pairs kept, reversed and tied (both near chance) in >= 97.5% of the replicates each."""
        keep = [p for p, s in self.pair_support.items() if s >= ESTABLISHED]
        rev = [p for p, s in self.pair_reversed.items() if s >= ESTABLISHED]
        tied = [p for p, s in self.pair_support.items() if 1 - s - self.pair_reversed[p] >= ESTABLISHED]
        return keep, rev, tied


def _clip(v: float, chance: float) -> float:
    return chance if v >= chance - NEAR_CHANCE else v


def _medians(rows: list[RowRuns], rng: Optional[np.random.Generator], images: Optional[np.ndarray]) -> np.ndarray:
    out = []
    for r in rows:
        idx = np.arange(len(r.errors)) if rng is None else rng.integers(0, len(r.errors), len(r.errors))
        errs = []
        for i in idx:
            c = r.correct[i] if images is not None else None
            errs.append(100.0 * (1.0 - float(c[images].mean())) if c is not None else float(r.errors[i]))
        out.append(_clip(float(np.median(errs)), r.chance))
    return np.array(out)


def ordering_claim(rows: list[RowRuns], replicates: int = 2000, seed: int = 0) -> Claim:
    """The claim for rows with at least one finished run each (rows without runs are left out).

    Args:
        rows: the panel's rows, each with its paper error and runs.
        replicates: bootstrap replicates.
        seed: the bootstrap's and the sampled permutation test's seed.
    Returns:
        :class:`Claim`.
    """
    rows = [r for r in rows if r.errors]
    paper = np.array([r.paper for r in rows], float)
    here = _medians(rows, None, None)
    kept, rev, tied = concordant_pairs(paper, here)
    p, how = ordering_pvalue(paper, here, seed=seed) if len(rows) >= 2 else (float("nan"), "fewer than 2 rows")
    sizes = {len(c) for r in rows for c in r.correct if c is not None}
    # every run has its per-image results, or sits at chance (a diverged run: no image resampling moves it)
    per_image = len(sizes) == 1 and all(
        len(r.correct) == len(r.errors) and all(c is not None or e == r.chance for c, e in zip(r.correct, r.errors))
        for r in rows)
    n_img = sizes.pop() if per_image else 0
    multi_seed = any(len(r.errors) > 1 for r in rows)
    resampled = ("seeds and test images (paired: one redraw of the test images for every run)" if per_image else
                 "seeds only (per-image test results not available)" if multi_seed else
                 "nothing: one seed per row and no per-image test results")
    pairs = [(a, b) for a, b in itertools.combinations(range(len(rows)), 2) if paper[a] != paper[b]]
    pairs = [(a, b) if paper[a] < paper[b] else (b, a) for a, b in pairs]
    rng = np.random.default_rng(seed)
    counts, hold, flip = [], np.zeros(len(pairs)), np.zeros(len(pairs))
    for _ in range(replicates if (per_image or multi_seed) else 0):
        images = rng.integers(0, n_img, n_img) if per_image else None
        m = _medians(rows, rng, images)
        k, _, t = concordant_pairs(paper, m)
        counts.append(k)
        for j, (a, b) in enumerate(pairs):
            hold[j] += m[b] > m[a]
            flip[j] += m[b] < m[a]
    n = len(counts)
    support = {(rows[a].row, rows[b].row): (hold[j] / n if n else float(here[b] > here[a]))
               for j, (a, b) in enumerate(pairs)}
    against = {(rows[a].row, rows[b].row): (flip[j] / n if n else float(here[b] < here[a]))
               for j, (a, b) in enumerate(pairs)}
    interval = percentile_interval(counts) if n else (float(kept), float(kept))
    return Claim([r.row for r in rows], kept, rev, tied, p, how, interval, support, against, resampled, n)


def claim_lines(claims: dict) -> list[str]:
    """One line per panel ({panel: Claim}): the count, its p-value, its interval, the established pairs."""
    out = []
    for panel, c in claims.items():
        where = f" ({panel})" if panel else ""
        if c.pairs == 0:
            continue
        keep, rev, tied = c.established()
        lo, hi = c.kept_interval
        sig = c.p_value < 0.05
        out.append(
            f"ordering test{where}: {c.kept} of {c.pairs} pairs in the paper's order; a random ordering of these "
            f"rows keeps as many with p = {c.p_value:.3g} ({c.p_method}): "
            + ("the agreement is unlikely by chance" if sig else "NOT distinguishable from a random ordering")
            + f". Bootstrap over {c.resampled}" + (f", {c.replicates} replicates: count in [{lo:.0f}, {hi:.0f}] "
                                                   f"(95%); {len(keep)} pair(s) kept, {len(rev)} reversed and "
                                                   f"{len(tied)} tied (both near chance) in at least "
                                                   f"{ESTABLISHED:.1%} of them each, the other "
                                                   f"{c.pairs - len(keep) - len(rev) - len(tied)} not "
                                                   "established either way"
                                                   if c.replicates else ": no pair is established")
            + ".")
    return out
