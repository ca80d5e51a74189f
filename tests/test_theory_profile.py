"""Fit selection on synthetic profiles of known shape and noise; bootstrap intervals that cover at their rate."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gradflow.theory.profile import fit_profile, profile_fits


def _tables(log_profile, rng, samples=32, walk=0.05, spread=0.3, var=None):
    """Per-sample norms: log g_{l,i} = a_i + profile_l + a random walk along depth (correlated residuals)."""
    L = len(log_profile)
    a = rng.normal(0, spread, samples)
    steps = rng.normal(0, walk, (L + 1, samples))
    noise = np.cumsum(steps[::-1], axis=0)[::-1]                # correlated from the top down
    logs = np.vstack([np.asarray(log_profile)[:, None] + a + noise[:L], (a + noise[L])[None, :]])
    rows = [dict(step=0, unit=u, sample=i, grad_norm=float(np.exp(logs[u, i])))
            for u in range(L + 1) for i in range(samples)]
    var = np.ones(L + 1) if var is None else np.append(var, var[-1])
    units = pd.DataFrame(dict(step=0, unit=range(L + 1), is_top=[False] * L + [True], x_shape="16x8x8",
                              x_var=var))
    return pd.DataFrame(rows), units


def test_exponential_profile_is_chosen_and_its_interval_covers_the_true_rate():
    rng = np.random.default_rng(0)
    L, s = 20, 0.08
    d = L - np.arange(L)
    var = 1.0 + np.arange(L)                                   # Var grows linearly: a power law competes
    hits, widths, slopes = 0, [], []
    draws = 60
    for _ in range(draws):
        samples, units = _tables(s * d, rng, var=var)
        (fit,) = profile_fits(samples, units, n_boot=200, seed=int(rng.integers(1 << 30)))
        assert fit["better"] == "exponential", fit["why"]
        e = fit["exponential"]
        hits += e["ci_low"] <= s <= e["ci_high"]
        widths.append(e["ci_high"] - e["ci_low"])
        slopes.append(e["slope"])
    assert 0.85 <= hits / draws <= 1.0
    # the interval measures the spread of the slope over draws, not the lack of fit
    assert np.median(widths) / (2 * 1.96 * np.std(slopes)) == pytest.approx(1.0, abs=0.35)


def test_power_law_in_variance_is_chosen_with_the_mean_field_exponent():
    rng = np.random.default_rng(1)
    L = 30
    var = 0.4 + np.arange(L) * 1.0                             # De & Smith: linear variance
    logr = -0.5 * np.log(var) + 0.5 * np.log(var[-1] + 1.0)
    hits = 0
    for _ in range(30):
        samples, units = _tables(logr, rng, walk=0.02, var=var)
        (fit,) = profile_fits(samples, units, n_boot=200, seed=int(rng.integers(1 << 30)))
        assert fit["better"] == "power law", fit["why"]
        p = fit["power law"]
        hits += p["ci_low"] <= -0.5 <= p["ci_high"]
    assert hits / 30 >= 0.8


def test_u_shape_and_zeros_print_no_rate():
    rng = np.random.default_rng(2)
    L = 24
    u = np.arange(L)
    logr = 0.004 * (u - 15) ** 2 - 0.9                        # 1.0 at the ends' scale, a dip at unit 15
    samples, units = _tables(logr, rng, walk=0.01)
    (fit,) = profile_fits(samples, units)
    assert fit["better"] is None and fit["shape"] == "U-shaped" and "neither" in fit["why"]
    samples.loc[samples["unit"] == 3, "grad_norm"] = 0.0
    (fit,) = profile_fits(samples, units)
    assert fit["better"] is None and "no fit" in fit["why"]


def test_a_noisy_profile_that_neither_model_fits_says_so():
    rng = np.random.default_rng(3)
    logr = np.where(np.arange(20) < 10, 1.0, 0.0)             # a jump in the middle of the group
    out = fit_profile(np.arange(20), logr + rng.normal(0, 0.3, 20), np.log(1.0 + np.arange(20)))
    assert out["better"] is None and "neither" in out["why"]
