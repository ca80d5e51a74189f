"""Theory: fits recover known slopes; predictions follow eq. (5) and (8)."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

import gradflow
from gradflow.theory import decay_rate, fit_slope, predict_direct, predicted_rate, summarize, variance_growth


def test_fit_slope_recovers_slope_with_group_intercepts_and_a_ci_that_covers_it():
    rng = np.random.default_rng(0)
    x = np.arange(60.0)
    groups = x // 20
    y = 0.3 * x + np.array([5.0, -2.0, 9.0])[groups.astype(int)] + rng.normal(0, 0.5, 60)
    fit = fit_slope(x, y, groups)
    assert abs(fit.slope - 0.3) < 0.02
    assert fit.contains(0.3) and fit.ci_high - fit.ci_low < 0.1
    exact = fit_slope(x, 0.3 * x + groups * 7, groups)
    assert exact.slope == pytest.approx(0.3) and exact.r2 == pytest.approx(1.0)


def _table(values, column, stages=None, coef=None):
    n = len(values)
    df = pd.DataFrame({"step": 0, "unit": np.arange(n), "stage": stages if stages is not None else 0,
                       "is_top": [False] * (n - 1) + [True], column: values,
                       "scalar_coef": coef if coef is not None else 1.0})
    df["x_shape"] = df["stage"].astype(str)
    return df


def test_decay_rate_of_a_geometric_sequence_is_its_log_ratio():
    L = 12
    values = 0.7 ** (L - np.arange(L + 1))       # shrinks by 0.7 per unit toward the input
    fit = decay_rate(_table(values, "grad_ratio"), "grad_ratio")
    assert fit.slope == pytest.approx(math.log(0.7))


def test_predict_direct_is_the_product_of_lambdas_where_covered():
    L = 6
    coef = [0.5] * L + [np.nan]
    df = _table(np.ones(L + 1), "ref_ratio", coef=coef)
    df["ref_ratio"] = 123.0                      # a measured chain: the prediction must not read it
    df["f_identity"], df["h_plain"] = 1.0, 1.0
    df["direct_ratio"] = 0.5 ** (L - df["unit"])
    out = predict_direct(df)
    np.testing.assert_allclose(out["pred_direct_ratio"], 0.5 ** (L - np.arange(L + 1)))
    np.testing.assert_allclose(out["direct_vs_pred"], 1.0)
    assert set(out["pred_basis"]) == {"eq. (8)", "x_L"}
    assert predicted_rate(df) == pytest.approx(math.log(0.5))
    df.loc[2, "scalar_coef"] = np.nan            # a gate: not covered, the others still are
    out = predict_direct(df)
    assert out.loc[2, "pred_basis"].startswith("not covered") and np.isnan(out.loc[2, "pred_direct_ratio"])
    assert predicted_rate(df) == pytest.approx(math.log(0.5))
    df["scalar_coef"] = np.nan
    assert math.isnan(predicted_rate(df))


class Scaled(nn.Module):
    """x + a x: a unit whose every rate is known in closed form."""

    def __init__(self, a):
        super().__init__()
        self.a = a
        self.branch = nn.Identity()

    def forward(self, x):
        return x + self.a * self.branch(x)


@pytest.mark.parametrize("a", [0.2, math.sqrt(2) - 1, 1.0])
def test_rates_on_a_constructed_network(a):
    net = nn.Sequential(*[Scaled(a) for _ in range(10)])
    parts = {"branch": lambda x, a=a: a * x}
    x = torch.randn(8, 4, 5, 5)
    from gradflow.probe.quantities import Structure
    with gradflow.trace(net, units="*", parts=parts, quantities=[Structure()]) as tr:
        net(x).square().sum().backward()
    s = summarize(tr.units)
    # dE/dx_l = (1 + a)^(L - l) dE/dx_L: log-rate log(1 + a) toward the input
    assert s["total_rate"]["slope"] == pytest.approx(math.log(1 + a), rel=1e-5)
    # the direct term is dE/dx_L at every unit (eq. 5)
    assert s["direct_rate"]["slope"] == pytest.approx(0.0, abs=1e-6)
    assert s["predicted_direct_rate"] == 0.0 and s["direct_obeys_closed_form"]   # a check of the split
    # Var(x_l) = (1 + a)^(2l) Var(x_0)
    v = variance_growth(tr.units)
    assert v["log"]["slope"] == pytest.approx(2 * math.log(1 + a), rel=1e-5)
    assert v["better_fit"] == "exponential"
    assert v["doubling_per_unit"] == (abs((1 + a) ** 2 - 2) < 0.05)


def test_bn_preact_net_grows_linearly_at_init():
    """docs/theory.md, section 6: Var(x_l) in a BN pre-activation net grows about linearly."""
    torch.manual_seed(0)
    m = gradflow.create_model("resnet110")
    with gradflow.trace(m) as tr:
        nn.functional.cross_entropy(m(torch.randn(16, 3, 32, 32)), torch.randint(0, 10, (16,))).backward()
    v = variance_growth(tr.units)
    assert v["better_fit"] == "linear" and v["linear"]["r2"] > 0.95 and v["linear"]["slope"] > 0
