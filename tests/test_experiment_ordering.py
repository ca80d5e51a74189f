"""The ordering lines of an experiment's results: pair counts against scipy's Kendall tau and a
hand-counted case with the paper's "fail" rows; no line is written by hand."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kendalltau

from gradflow.experiments.ordering import concordance, ordering_lines, paper_rank


def _table(rows, seeds=1, spread=0.0, dataset="cifar10"):
    return pd.DataFrame([dict(row=r, dataset=dataset, paper_error=p, median_error=m, seeds_finished=seeds,
                              spread=spread) for r, p, m in rows])


@pytest.mark.parametrize("seed", range(5))
def test_pair_counts_match_kendall_tau(seed):
    rng = np.random.default_rng(seed)
    names = [f"r{i}" for i in range(7)]
    paper = dict(zip(names, rng.permutation(7) + 5.0))
    here = dict(zip(names, rng.permutation(7) * 3.0 + 40))
    kept, rev, tied = concordance(paper, here)
    assert not tied and len(kept) + len(rev) == 21
    tau = kendalltau([paper[k] for k in names], [here[k] for k in names]).statistic
    assert (len(kept) - len(rev)) / 21 == pytest.approx(tau)


def test_fail_rows_are_worse_than_any_error_and_not_a_pair_among_themselves():
    assert paper_rank("fail") == math.inf and paper_rank("6.61") == 6.61 and paper_rank("") is None
    t = _table([("table1-original", "6.61", 40.0), ("table1-conv-shortcut", "12.22", 35.0),
                ("table1-scale-0.5", "fail", 88.0), ("table1-dropout-shortcut", "fail", 30.0)])
    lines = ordering_lines(t, {})
    # pairs: original<conv (reversed), original<scale (kept), original<dropout (reversed),
    # conv<scale (kept), conv<dropout (reversed); scale vs dropout is not a pair
    head = next(x for x in lines if x.startswith("ordering"))
    assert "2 of 5 pairs the paper tells apart keep its order, 3 are reversed" in head
    assert "does NOT appear" in head
    assert any(x.startswith("near chance") and "scale-0.5 88.00%" in x for x in lines)
    fails = next(x for x in lines if x.startswith("rows the paper reports as failing"))
    assert "2 of 2 above 20% here" in fails and "every row is above 20%" in fails
    assert any(x.startswith("one seed per row") for x in lines)


def test_full_agreement_and_panels_are_compared_apart():
    t = _table([("a", "6.0", 30.0), ("b", "7.0", 31.0), ("c", "5.0", 50.0), ("d", "6.0", 40.0)], seeds=3,
               spread=2.5)
    lines = ordering_lines(t, {"a": "p1", "b": "p1", "c": "p2", "d": "p2"})
    p1 = next(x for x in lines if x.startswith("ordering (p1)"))
    p2 = next(x for x in lines if x.startswith("ordering (p2)"))
    assert "1 of 1 pairs" in p1 and "appears in full" in p1
    assert "0 of 1 pairs" in p2 and "does NOT appear" in p2
    assert any("up to 2.50 points" in x for x in lines)


def test_rows_near_chance_are_not_in_the_papers_order():
    # two rows that did not learn (87% and 89%, chance 90%) are not "ordered" by their noise
    t = _table([("a", "6.0", 50.0), ("b", "7.0", 87.0), ("c", "8.0", 89.0)])
    head = next(x for x in ordering_lines(t, {}) if x.startswith("ordering"))
    assert "2 of 3 pairs" in head and "1 tied" in head and "near chance count as tied" in head
    assert "appears in full" not in head and "only in part" in head
