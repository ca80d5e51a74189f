"""Rank statistics against scipy.stats, the ordering test against known answers (the Mahonian
distribution), and the bootstrap over seeds and test images on constructed cases."""
import math

import numpy as np
import pytest
import scipy.stats

from gradflow.experiments.claims import RowRuns, ordering_claim
from gradflow.experiments.stats import (concordant_pairs, kendall_tau_b, mahonian, ordering_pvalue, rankdata,
                                        spearman)

KNOWN_X = [3.1, 1.2, 5.5, 5.5, 2.0, 8.9, 0.4, 2.0, 7.7, 6.1]
KNOWN_Y = [2.0, 1.0, 4.0, 3.5, 2.0, 9.0, 0.5, 1.5, 6.0, 7.0]


def test_rankdata_matches_scipy_with_ties_and_inf():
    a = [3.0, math.inf, 1.0, 3.0, math.inf, 0.5]
    assert np.allclose(rankdata(a), scipy.stats.rankdata(a))
    assert np.allclose(rankdata(KNOWN_X), scipy.stats.rankdata(KNOWN_X))
    with pytest.raises(ValueError, match="NaN"):
        rankdata([1.0, float("nan")])


def test_spearman_and_kendall_match_scipy_on_known_data():
    rho = scipy.stats.spearmanr(KNOWN_X, KNOWN_Y).statistic
    tau = scipy.stats.kendalltau(KNOWN_X, KNOWN_Y).statistic     # tau-b, ties on both sides
    assert spearman(KNOWN_X, KNOWN_Y) == pytest.approx(rho, abs=1e-12)
    assert kendall_tau_b(KNOWN_X, KNOWN_Y) == pytest.approx(tau, abs=1e-12)
    rng = np.random.default_rng(3)
    for _ in range(5):
        x, y = rng.integers(0, 5, 12).astype(float), rng.normal(size=12)
        assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
        assert kendall_tau_b(x, y) == pytest.approx(scipy.stats.kendalltau(x, y).statistic, abs=1e-12)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_mahonian_numbers():
    assert list(mahonian(5)) == [1, 4, 9, 15, 20, 22, 20, 15, 9, 4, 1]
    assert sum(mahonian(6)) == math.factorial(6)


def test_ordering_pvalue_known_answers():
    paper = [1.0, 2.0, 3.0, 4.0, 5.0]
    # one pair swapped: 9 of 10 pairs kept; P(<= 1 inversion) = (1 + 4) / 120
    here = [1.0, 3.0, 2.0, 4.0, 5.0]
    assert concordant_pairs(paper, here) == (9, 1, 0)
    p, how = ordering_pvalue(paper, here)
    assert how == "exact" and p == pytest.approx(5 / 120)
    # 7 of 10: P(<= 3 inversions) = (1 + 4 + 9 + 15) / 120 = 0.242
    here = [2.0, 3.0, 1.0, 5.0, 4.0]      # inversions: (2,1), (3,1), (5,4)
    assert concordant_pairs(paper, here)[0] == 7
    assert ordering_pvalue(paper, here)[0] == pytest.approx(29 / 120)
    # in full: 1/5!
    assert ordering_pvalue(paper, paper)[0] == pytest.approx(1 / 120)


def test_ordering_pvalue_equals_scipys_exact_kendall_test():
    rng = np.random.default_rng(1)
    for n in (4, 6, 7):
        paper = np.arange(n, dtype=float)
        here = paper + rng.normal(scale=2.0, size=n)
        ref = scipy.stats.kendalltau(paper, here, method="exact", alternative="greater").pvalue
        assert ordering_pvalue(paper, here)[0] == pytest.approx(ref, rel=1e-9)


def test_sampled_pvalue_agrees_with_the_exact_tail():
    n = 10                                   # 10! permutations: sampled
    paper = np.arange(n, dtype=float)
    here = paper.copy()
    here[[0, 1]] = here[[1, 0]]
    here[[5, 6]] = here[[6, 5]]
    here[[8, 9]] = here[[9, 8]]              # 3 inversions
    exact = float(sum(mahonian(n)[:4])) / math.factorial(n)
    p, how = ordering_pvalue(paper, here, samples=200_000)
    assert how.startswith("sampled")
    assert p == pytest.approx(exact, abs=4e-5 + 3 * math.sqrt(exact / 200_000))


def test_paper_ties_are_not_pairs():
    paper = [1.0, math.inf, math.inf]        # two "fail" rows: one pair less
    assert concordant_pairs(paper, [10.0, 80.0, 85.0]) == (2, 0, 0)


def test_bootstrap_over_seeds_separates_clear_pairs_and_not_overlapping_ones():
    rng = np.random.default_rng(0)
    good = RowRuns("a", 1.0, list(20 + rng.normal(0, 0.5, 5)), [None] * 5)
    bad = RowRuns("b", 2.0, list(40 + rng.normal(0, 0.5, 5)), [None] * 5)
    same1 = RowRuns("c", 3.0, [50.0, 52.0, 54.0, 56.0, 58.0], [None] * 5)
    same2 = RowRuns("d", 4.0, [51.0, 53.0, 55.0, 57.0, 49.0], [None] * 5)   # same spread, median 53 < 54
    claim = ordering_claim([good, bad, same1, same2], replicates=500)
    assert claim.resampled.startswith("seeds only")
    assert claim.pair_support[("a", "b")] == 1.0
    assert 0.1 < claim.pair_support[("c", "d")] < 0.7     # not established either way
    keep, rev, tied = claim.established()
    assert ("a", "b") in keep and ("c", "d") not in keep + rev + tied
    assert claim.kept == 5 and claim.reversed == 1


def _wrong(n, k, rng):
    c = np.ones(n, bool)
    c[rng.choice(n, k, replace=False)] = False
    return c


def test_bootstrap_over_test_images_widens_a_one_seed_claim():
    rng = np.random.default_rng(0)
    n = 400
    a, b = _wrong(n, 200, rng), _wrong(n, 204, rng)      # 50% vs 51%, wrong on unrelated images
    claim = ordering_claim([RowRuns("a", 1.0, [50.0], [a]), RowRuns("b", 2.0, [51.0], [b])], replicates=1000)
    assert claim.resampled.startswith("seeds and test images")
    # unpaired normal approximation: P(b > a) = Phi(1 / sqrt(2 * 0.25 / 400 * 1e4)) = 0.61
    assert 0.45 < claim.pair_support[("a", "b")] < 0.8
    one = ordering_claim([RowRuns("a", 1.0, [50.0]), RowRuns("b", 2.0, [52.0])], replicates=100)
    assert one.resampled.startswith("nothing")


def test_bootstrap_over_test_images_is_paired():
    rng = np.random.default_rng(0)
    a = _wrong(400, 200, rng)
    b = a.copy()
    b[np.flatnonzero(a)[:4]] = False          # wrong wherever a is, and on 4 images more
    claim = ordering_claim([RowRuns("a", 1.0, [50.0], [a]), RowRuns("b", 2.0, [51.0], [b])], replicates=1000)
    # b > a unless none of the 4 images is drawn: 1 - (1 - 1/400)^1600 = 0.982
    assert claim.pair_support[("a", "b")] == pytest.approx(0.982, abs=0.015)


def test_near_chance_rows_tie():
    a, b = RowRuns("a", 1.0, [88.0]), RowRuns("b", 2.0, [89.5])
    claim = ordering_claim([a, b], replicates=10)
    assert (claim.kept, claim.reversed, claim.tied) == (0, 0, 1)


def test_a_pair_tied_at_chance_in_every_replicate_is_established_tied_not_reversed():
    from gradflow.experiments.claims import claim_lines
    rows = [RowRuns("a", 1.0, [20.0, 21.0, 22.0]), RowRuns("b", 2.0, [88.0, 89.0, 90.0]),
            RowRuns("c", 3.0, [89.5, 88.5, 90.0])]      # b and c: near chance in every redraw of the seeds
    claim = ordering_claim(rows, replicates=200)
    keep, rev, tied = claim.established()
    assert keep == [("a", "b"), ("a", "c")] and rev == [] and tied == [("b", "c")]
    assert "2 pair(s) kept, 0 reversed and 1 tied (both near chance)" in claim_lines({"": claim})[0]


def test_claim_line_states_the_exact_p_and_what_was_resampled():
    from gradflow.experiments.claims import claim_lines
    here = [20.0, 30.0, 25.0, 40.0, 50.0]                    # one pair swapped: 9 of 10
    rows = [RowRuns(f"r{i}", float(i), [h]) for i, h in enumerate(here)]
    line = claim_lines({"p": ordering_claim(rows, replicates=50)})[0]
    assert line.startswith("ordering test (p): 9 of 10 pairs") and "p = 0.0417 (exact)" in line
    assert "unlikely by chance" in line and "no pair is established" in line
    rows = [RowRuns(f"r{i}", float(i), [h]) for i, h in enumerate([20.0, 40.0, 25.0, 30.0, 50.0])]
    line = claim_lines({"": ordering_claim(rows, replicates=50)})[0]     # 2 inversions: p = 14/120
    assert "p = 0.117" in line and "NOT distinguishable from a random ordering" in line
