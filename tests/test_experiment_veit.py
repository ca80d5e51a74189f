"""The captions' verdicts on Veit et al.'s findings, on constructed path and lesion tables."""
import math

import numpy as np
import pandas as pd
import pytest

from gradflow.experiments.veit import lesion_lines, path_bulk, path_lines


def test_path_bulk_of_resnet110():
    lo, hi = path_bulk(54)
    held = sum(math.comb(54, k) for k in range(lo, hi + 1)) / 2 ** 54
    assert held >= 0.95 and (lo, hi) == (20, 34)       # symmetric about n/2; Veit et al. 2016: over 95% on 19-35


def _sampled(n, per_path):
    ks = np.arange(n + 1)
    norm = per_path(ks)
    counts = np.array([math.comb(n, int(k)) for k in ks], float)
    return pd.DataFrame({"k": ks, "path_norm": norm, "total": norm * counts})


def test_veit_findings_appear_and_do_not_appear():
    n = 54
    exact = pd.DataFrame({"unit": 0, "k": np.arange(n + 1), "proj": np.r_[0.5, 0.3, 0.2, np.zeros(n - 2)]})
    falls = path_lines(exact, _sampled(n, lambda k: 10.0 ** (-0.5 * k)), n, 1000, "400 training iterations")
    assert falls[0].startswith("Veit Fig. 6b") and " appears on the trained network" in falls[0]
    assert "changes by -0.5 per branch" in falls[0]
    assert falls[1].startswith("Veit Fig. 6c") and " appears" in falls[1] and "k = 20-34" in falls[1]
    assert "k = 0-2" in falls[2] and not any("fewer than Veit" in x for x in falls)
    flat = path_lines(exact, _sampled(n, lambda k: np.ones(len(k))), n, 20)
    assert "does NOT appear at initialisation" in flat[1]                      # the bulk carries it
    assert any("fewer than Veit's 1,000" in x for x in flat)


def test_lesion_verdict():
    single = pd.DataFrame({"unit": range(6), "removable": True, "downsampling": [False, False, True] * 2,
                           "error": [11.0, 10.5, 40.0, 10.8, 11.2, 45.0]})
    line = lesion_lines(single, 10.0, "resnet110", "trained 400 iterations")[0]
    assert " appears" in line and "median +0.90 points" in line and "over 4 units" in line
    assert "no interval: the per-image results were not kept" in line
    single["error"] = [20.0, 25.0, 40.0, 18.0, 30.0, 45.0]
    assert "does NOT appear" in lesion_lines(single, 10.0, "resnet110", "trained")[0]


def _lesioned(n, base_wrong, extra, rng):
    """Per-image correctness: the intact net wrong on the first base_wrong images; each lesion also
    wrong on `extra` more images drawn at random from the rest."""
    intact = np.ones(n, bool)
    intact[:base_wrong] = False
    out = {}
    for u, e in enumerate(extra):
        c = intact.copy()
        c[base_wrong + rng.choice(n - base_wrong, size=e, replace=False)] = False
        out[u] = c
    return intact, out


@pytest.mark.parametrize("extra, n, verdict", [
    ([3, 5, 4, 6, 2], 1000, " appears"),                     # +0.2 to +0.6 points, 1,000 images
    ([60, 70, 65, 80, 55], 1000, "does NOT appear"),          # +5.5 to +8 points
    ([2, 1, 3, 2, 1], 100, "is not established either way"),  # +2 points on 100 images: too few
])
def test_lesion_verdict_holds_only_where_its_bootstrap_interval_does(extra, n, verdict):
    rng = np.random.default_rng(0)
    intact, lesioned = _lesioned(n, n // 2, extra, rng)
    err = {u: 100.0 * (~c).mean() for u, c in lesioned.items()}
    single = pd.DataFrame({"unit": list(err), "removable": True, "downsampling": False, "error": list(err.values())})
    base = 100.0 * (~intact).mean()
    line = lesion_lines(single, base, "net", "trained", intact, lesioned, replicates=4000)[0]
    assert verdict in line
    lo, hi = (float(v) for v in line.split("95% interval [")[1].split("]")[0].split(", "))
    median = 100.0 * np.median(extra) / n                     # the rise, exactly
    assert f"median +{median:.2f} points" in line and lo <= median <= hi
    # the interval's width is the paired sampling error: for e of n images flipped, the rise's
    # standard error is about 100 sqrt(e) / n points (Poisson count of the flipped images)
    se = 100.0 * np.sqrt(np.median(extra)) / n
    assert se < hi - lo < 6 * se


@pytest.mark.slow
def test_paths_command_captions_say_whether_veit_appears(tmp_path):
    from gradflow.cli.paths import main
    assert main(["--model", "resnet20", "--batch", "2", "--samples", "4", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "paths_resnet20_contribution.txt").read_text()
    assert "Veit Fig. 6c" in text and "at initialisation (Veit's findings are about trained networks" in text
    assert "4 sampled paths per length, fewer than Veit's 1,000" in text
    assert "Veit Fig. 6b" in (tmp_path / "paths_resnet20_gradient_per_path.txt").read_text()


def test_a_network_far_from_trained_is_not_called_a_replication():
    n = 54
    exact = pd.DataFrame({"unit": 0, "k": np.arange(n + 1), "proj": np.r_[0.5, 0.3, 0.2, np.zeros(n - 2)]})
    sampled = _sampled(n, lambda k: 10.0 ** (-0.5 * k))
    poor = path_lines(exact, sampled, n, 1000, "400 training iterations", error=56.2)
    assert "far from trained (56.2% test error" in poor[-1] and "not a replication" in poor[-1]
    good = path_lines(exact, sampled, n, 1000, "64k training iterations", error=6.6)
    assert not any("far from trained" in x for x in good)
    single = pd.DataFrame({"unit": range(3), "removable": True, "downsampling": False, "error": [57.0, 56.5, 58.0]})
    assert "far from trained (56.2% test error" in lesion_lines(single, 56.2, "resnet110", "400 iterations")[-1]
    assert len(lesion_lines(single.assign(error=[7.0, 6.9, 7.2]), 6.6, "resnet110", "64k iterations")) == 1


def test_fig6c_verdict_on_a_coarse_grid_says_what_the_grid_cannot_tell():
    n = 54
    exact = pd.DataFrame({"unit": 0, "k": np.arange(n + 1), "proj": np.r_[1.0, np.zeros(n)]})
    # the total spread evenly over k = 10..22: at full resolution 90% needs k up to 21 or 22, inside
    # the bulk (20-34) -> does NOT appear; sampled every 6th length only 12 and 18 carry it
    flat = _sampled(n, lambda k: np.where((k >= 10) & (k <= 22), 1.0, 1e-30) /
                    np.array([math.comb(n, int(j)) for j in k], float))
    assert "does NOT appear" in path_lines(exact, flat, n, 1000, "trained")[1]
    coarse = flat[flat["k"] % 6 == 0]
    line = path_lines(exact, coarse, n, 1000, "trained")[1]
    assert "is not established at this resolution" in line and "upper end lies in 18-23" in line
    fast = _sampled(n, lambda k: 10.0 ** (-3.0 * k))            # all at k = 0: below the bulk on any grid
    assert " appears" in path_lines(exact, fast[fast["k"] % 6 == 0], n, 1000, "trained")[1]
