"""Predictions of the direct term and of the total gradient, each against a closed form or plain autograd."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gradflow.models.units import ScaledSum
from gradflow.probe import synthetic
from gradflow.probe.quantities import probe_quantities
from gradflow.probe.step import trace_at_init
from gradflow.theory.predict import NOT_F, NOT_H, UNKNOWN, coverage, predict_direct, predicted_rate
from gradflow.theory.robust import degenerate_samples, median_ratios
from gradflow.theory.total import gradient_scale, isotropy_total, meanfield_total
from gradflow.tracing.parts import Parts, run_parts


class Unit(nn.Module):
    """x_{l+1} = f(lam x_l + F(x_l)): F linear (``relu=False``) or W2 relu(W1 x); f the identity or a ReLU."""

    stage = 0
    forward_is_parts = True

    def __init__(self, d: int, lam: float, sigma2: float, relu: bool = False, post: bool = False):
        super().__init__()
        self.lam = lam
        w2 = nn.Linear(d, d, bias=False)
        nn.init.normal_(w2.weight, std=(sigma2 / d) ** 0.5)
        if relu:
            w1 = nn.Linear(d, d, bias=False)
            nn.init.normal_(w1.weight, std=(2.0 / d) ** 0.5)      # He: E[relu(W1 x)^2] = Var(x)
            self.branch = nn.Sequential(w1, nn.ReLU(), w2)
        else:
            self.branch = w2
        self.combine = ScaledSum(lam)
        self.post = nn.ReLU() if post else None

    def parts(self) -> Parts:
        return Parts(branch=self.branch, combine=self.combine, post=self.post)

    def shortcut_scalar(self) -> float:
        return self.lam

    def forward(self, x):
        return run_parts(self.parts(), x)


class Net(nn.Module):
    def __init__(self, d=256, depth=8, lam=1.0, sigma2=0.5, relu=False, post=False, classes=10):
        super().__init__()
        self.blocks = nn.Sequential(*[Unit(d, lam, sigma2, relu, post) for _ in range(depth)])
        self.head = nn.Linear(d, classes)

    def units(self):
        return list(self.blocks)

    def forward(self, x):
        return self.head(self.blocks(x))


def _trace(net, x, y):
    from gradflow.tracing import trace
    with trace(net, quantities=probe_quantities()) as tr:
        F.cross_entropy(net(x), y).backward()
    return tr


def _autograd_norms(net, x, y):
    """Per-sample ||dE/dx_l|| for every unit input and x_L, by plain autograd."""
    x = x.clone().requires_grad_()
    xs = []
    hooks = [u.register_forward_pre_hook(lambda m, a: xs.append(a[0])) for u in net.units()]
    hooks.append(net.units()[-1].register_forward_hook(lambda m, a, o: xs.append(o)))
    loss = F.cross_entropy(net(x), y)
    for h in hooks:
        h.remove()
    return torch.stack([g.flatten(1).norm(dim=1) for g in torch.autograd.grad(loss, xs)]).double().numpy()


# --- eq. (5)/(8): closed form where covered, the reason elsewhere ----------------------------

def test_linear_residual_net_direct_prediction_is_lambda_power_without_any_measured_chain():
    torch.manual_seed(0)
    net, L, lam = Net(d=32, depth=6, lam=0.7), 6, 0.7
    x, y = torch.randn(4, 32), torch.randint(0, 10, (4,))
    units = predict_direct(_trace(net, x, y).units)
    body = units[~units["is_top"]].sort_values("unit")
    assert (body["pred_basis"] == "eq. (8)").all()
    want = lam ** (L - body["unit"].to_numpy())
    np.testing.assert_allclose(body["pred_direct_factor"], want, rtol=1e-12)   # the closed form itself
    np.testing.assert_allclose(body["pred_direct_ratio"], want, rtol=1e-12)    # anchored at x_L = 1
    assert predicted_rate(units) == pytest.approx(np.log(lam))
    # the measured direct term agrees (a check of the split, not of the theory)
    np.testing.assert_allclose(body["direct_vs_pred"], 1.0, rtol=1e-5)


def test_coverage_reasons_and_anchors_at_an_uncovered_unit():
    rows = [dict(step=0, unit=i, is_top=False, scalar_coef=0.5, f_identity=1.0, h_plain=1.0,
                 direct_ratio=np.nan) for i in range(6)]
    rows[3].update(h_plain=0.0, direct_ratio=0.25)    # a projection at unit 3, its direct term measured
    rows[1].update(f_identity=0.0)                    # an activation after unit 1's addition
    rows.append(dict(step=0, unit=6, is_top=True, scalar_coef=np.nan, f_identity=np.nan, h_plain=np.nan,
                     direct_ratio=1.0))
    out = predict_direct(pd.DataFrame(rows)).set_index("unit")
    assert out.loc[3, "pred_basis"] == NOT_H and out.loc[1, "pred_basis"] == NOT_F
    assert np.isnan(out.loc[3, "pred_direct_ratio"]) and np.isnan(out.loc[1, "pred_direct_ratio"])
    assert out.loc[5, "pred_direct_ratio"] == 0.5 and out.loc[4, "pred_direct_ratio"] == 0.25
    assert out.loc[4, "pred_anchor"] == -1
    # below the projection: lambda^(3 - l) times the projection unit's measured direct term
    assert out.loc[2, "pred_direct_ratio"] == pytest.approx(0.5 * 0.25) and out.loc[2, "pred_anchor"] == 3
    assert out.loc[0, "pred_direct_ratio"] == pytest.approx(0.5 * out.loc[1, "direct_ratio"], nan_ok=True)
    assert (coverage(pd.DataFrame(rows).drop(columns="f_identity")) == UNKNOWN).all()


def test_relu_after_the_addition_is_not_covered_in_a_traced_net():
    torch.manual_seed(0)
    net = Net(d=16, depth=3, post=True)
    units = predict_direct(_trace(net, torch.randn(4, 16), torch.randint(0, 10, (4,))).units)
    body = units[~units["is_top"]]
    assert (body["pred_basis"] == NOT_F).all() and body["pred_direct_ratio"].isna().all()
    assert np.isnan(predicted_rate(units))


# --- the total: mean field and isotropy against their closed forms --------------------------

def test_mean_field_and_isotropy_in_a_wide_relu_residual_net():
    """Large width: Var(x_l) = Var(x_0)(1 + s2)^l and ||dE/dx_l|| / ||dE/dx_L|| = (1 + s2)^((L - l)/2)."""
    torch.manual_seed(1)
    d, L, s2 = 1024, 8, 0.5
    net = Net(d=d, depth=L, sigma2=s2, relu=True)
    x, y = torch.randn(16, d), torch.randint(0, 10, (16,))
    units = isotropy_total(meanfield_total(median_ratios(_trace(net, x, y).units)))
    body = units[~units["is_top"]].sort_values("unit")
    closed = (1 + s2) ** ((L - body["unit"].to_numpy()) / 2)
    assert (body["mf_basis"] == "mean field").all()
    np.testing.assert_allclose(body["mf_factor"], closed, rtol=0.08)     # from the forward variances
    np.testing.assert_allclose(body["gain_sq"], 1 + s2, rtol=0.05)       # each unit's random-direction gain
    np.testing.assert_allclose(body["iso_ratio"], closed, rtol=0.08)
    measured = _autograd_norms(net, x, y)
    ratio = np.sqrt((measured[:-1] ** 2).mean(1) / (measured[-1] ** 2).mean())
    np.testing.assert_allclose(ratio, closed, rtol=0.1)                  # the theory holds here


def test_isotropy_gain_of_a_linear_unit_is_its_jacobians_mean_squared_singular_value():
    torch.manual_seed(2)
    d, lam = 64, 0.8
    unit = Unit(d, lam, 1.0)
    J = lam * torch.eye(d) + unit.branch.weight                     # y = J x per sample
    want = float((J ** 2).sum() / d)                                # tr(J J^T) / n_out
    net = nn.Sequential(unit)
    net.units = lambda: [unit]
    net.head = nn.Identity()
    from gradflow.tracing import trace
    gains = []
    for seed in range(40):
        with trace(net, quantities=probe_quantities(seed)) as tr:
            F.cross_entropy(net(torch.randn(8, d)), torch.randint(0, d, (8,))).backward()
        gains.append(float(tr.units.loc[~tr.units["is_top"], "gain_sq"].iloc[0]))
    assert np.mean(gains) == pytest.approx(want, rel=0.02)       # unbiased over directions


@pytest.mark.slow
def test_bn_preact_variance_grows_linearly_averaged_over_seeds():
    """De & Smith 2020: in a full pre-activation BN net each unit adds Var(F) ~ 1 (He init, c_in = c_out)."""
    incs = []
    for seed in range(3):
        tr = trace_at_init("resnet44", {}, seed=seed, batch_size=16).tracer
        u = tr.units
        s0 = u[(u["stage"] == 0) & ~u["is_top"]].sort_values("unit")["x_var"].to_numpy()
        incs.append(np.diff(s0[1:]))    # within stage 0, after the stem's unit
    incs = np.concatenate(incs)
    assert incs.mean() == pytest.approx(1.0, abs=0.15)
    assert incs.std() / np.sqrt(len(incs)) < 0.1


def test_gradient_scale_coefficient_against_plain_autograd():
    built_tr = trace_at_init("resnet20", {}, seed=0, batch_size=8)
    units = gradient_scale(median_ratios(built_tr.units))
    from gradflow.probe import build_model
    net = build_model("resnet20", {}, seed=0).module
    (x, y), = synthetic(8, 1, 32, seed=0)
    net.train()
    xs = []
    hooks = [u.register_forward_pre_hook(lambda m, a: xs.append(a[0])) for u in net.units()]
    hooks.append(net.units()[-1].register_forward_hook(lambda m, a, o: xs.append(o)))
    loss = F.cross_entropy(net(x), y % 10)
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(loss, xs)
    g = np.array([np.median(t.flatten(1).norm(dim=1).numpy()) for t in grads])
    xn = np.array([np.median(t.detach().flatten(1).norm(dim=1).numpy()) for t in xs])
    want = g / g[-1] * xn / xn[-1]
    got = units.sort_values("unit")["gsc"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4)


# --- robust statistics ---------------------------------------------------------------------

def test_degenerate_samples_are_named_and_the_median_ratio_ignores_them():
    rng = np.random.default_rng(0)
    B, top = 16, 3
    t = np.exp(rng.normal(0, 0.1, B))
    t[[2, 7, 11]] = 1e-6                                    # saturated softmax: ||dE/dx_L|| ~ 0
    g = 5.0 * np.exp(rng.normal(0, 0.1, B))
    rows = [dict(step=0, unit=u, sample=i, grad_norm=(t[i] if u == top else g[i] * (top - u)),
                 grad_ratio=(1.0 if u == top else g[i] * (top - u) / t[i])) for u in range(top + 1) for i in range(B)]
    samples = pd.DataFrame(rows)
    units = samples.groupby("unit")["grad_norm"].agg(grad_norm="mean", grad_norm_q50="median",
                                                     grad_norm_std="std").reset_index()
    units["grad_ratio"] = samples.groupby("unit")["grad_ratio"].mean().to_numpy()
    units["is_top"], units["step"] = units["unit"] == top, 0
    bad = degenerate_samples(samples, units)
    assert [b["sample"] for b in bad] == [2, 7, 11]
    med = median_ratios(units).set_index("unit")["grad_ratio_med"]
    assert med[0] == pytest.approx(np.median(g * 3) / np.median(t), rel=1e-9)
    assert med[0] < 30 and units.set_index("unit")["grad_ratio"][0] > 1e5   # the mean is set by three samples
