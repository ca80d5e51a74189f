"""dE/dx_l by path length against independent computations: plain autograd, detached-branch
networks, closed-form products of linear branches, and Veit's sampling done here by hand."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradflow
from gradflow.models.units import ScaledSum
from gradflow.tracing.parts import Parts
from gradflow.theory.paths import effective_range, path_counts
from gradflow.tracing.paths import path_components, sample_paths
from gradflow.tracing.paths.carrier import PathCarrier
from tracing_helpers import unit_inputs_and_grads, zoo_direct

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py



def batch(n=3, size=32, classes=10, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g).to(dtype), torch.randint(0, classes, (n,), generator=g)


def loss_of(y):
    return lambda out: F.cross_entropy(out, y)


VARIANTS = [dict(), dict(unit="original"), dict(unit="bn_after_addition", shortcut="conv"),
            dict(unit="relu_before_addition", downsample="pad"), dict(unit="relu_only_preact", shortcut="dropout"),
            dict(unit="original", shortcut="exclusive_gate", gate_bias=-1.0),
            dict(shortcut="shortcut_gate", gate_bias=-1.0), dict(shortcut="scale", scale=0.5, scale_branch=True)]


@pytest.mark.parametrize("kw", VARIANTS + [dict(unit="original", shortcut="exclusive_gate", gate_bias=-1.0,
                                                _gate_rerun=True),
                                           dict(unit="bn_after_addition", shortcut="shortcut_gate", gate_bias=-1.0,
                                                _gate_rerun=True)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_components_sum_to_autograd_gradient(kw):
    kw = dict(kw)
    rerun = kw.pop("_gate_rerun", False)   # the gate's path from a second combine, as inside gradflow.trace
    m = gradflow.create_model("resnet20", width=0.25, **kw).double()
    x, y = batch(dtype=torch.float64)
    torch.manual_seed(0)
    _, grads = unit_inputs_and_grads(m, m.units(), x, y, seed=0)
    torch.manual_seed(0)   # the dropout shortcut draws the same masks in the same order
    res = path_components(m, x, y=y, keep=True, _gate_rerun=rerun)
    for i, g in enumerate(grads[:-1]):
        comp = res.components[i]
        assert comp.shape == (len(m.units()) - i + 1, *g.shape)
        torch.testing.assert_close(comp.sum(0), g, rtol=1e-10, atol=1e-14)
    assert res.units["sum_rel_err"].max() < 1e-10
    top = res.table[res.table["unit"] == 0]
    assert top["proj"].sum() == pytest.approx(1.0, abs=1e-10)       # signed shares add up to dE/dx_0
    assert top["n_paths"].sum() == 2 ** len(m.units())


@pytest.mark.parametrize("max_len,batched", [(0, False), (3, True)])
def test_remainder_keeps_the_sum_and_equals_the_long_paths(max_len, batched):
    """Also: one vmap'ed product for all components (batched) equals one product each."""
    m = gradflow.create_model("resnet20", width=0.25, unit="original", shortcut="exclusive_gate",
                              gate_bias=-1.0).double()
    x, y = batch(dtype=torch.float64)
    full = path_components(m, x, y=y, keep=True, batched=not batched)
    cut = path_components(m, x, y=y, keep=True, max_len=max_len, batched=batched)
    for i, comp in cut.components.items():
        every = full.components[i]
        n_kept = min(max_len + 1, every.shape[0])
        torch.testing.assert_close(comp[:n_kept], every[:n_kept], rtol=1e-9, atol=1e-15)
        if comp.shape[0] > n_kept:   # the remainder: every path longer than max_len
            torch.testing.assert_close(comp[-1], every[max_len + 1:].sum(0), rtol=1e-9, atol=1e-15)
    assert set(cut.table.loc[cut.table["k"] < 0, "unit"]) == {
        i for i in range(9) if 9 - i > max_len}


@pytest.mark.parametrize("kw", [dict(), dict(unit="original", shortcut="exclusive_gate", gate_bias=-1.0),
                                dict(shortcut="scale", scale=0.5), dict(unit="bn_after_addition", shortcut="conv")])
def test_shortest_component_is_the_direct_term(kw):
    """g^(0) against a forward in which every branch (and gate) is detached (tests/tracing_helpers.py)."""
    m = gradflow.create_model("resnet20", width=0.25, **kw).double()
    x, y = batch(dtype=torch.float64)
    directs, _ = zoo_direct(m, x, y)
    for rerun in (False, True) if "gate" in kw.get("shortcut", "") else (False,):
        res = path_components(m, x, y=y, keep=True, max_len=1, _gate_rerun=rerun)
        for i, d in enumerate(directs):
            torch.testing.assert_close(res.components[i][0], d, rtol=1e-9, atol=1e-15)


def test_direct_term_at_depth_does_not_underflow():
    """lambda = 0.5 on ResNet-110 in float32: within a stage the direct path is lambda^n times
    dE/dx_L (eq. 8); at the input it is below 0.5^54 ~ 5.6e-17 of it and still resolved."""
    m = gradflow.create_model("resnet110", width=0.25, shortcut="scale", scale=0.5, unit="relu_only_preact")
    x, y = batch(2)
    res = path_components(m, x, y=y, max_len=1)
    t = res.table.set_index(["unit", "k"])["norm"]
    stages = [u.stage for u in m.units()]
    last = len(stages) - 1
    g_top = t[(last, 0)] / 0.5
    for i in range(stages.index(stages[-1]) + 1, last + 1):   # identity shortcuts of the top stage
        assert t[(i, 0)] == pytest.approx(g_top * 0.5 ** (last - i + 1), rel=1e-5)
    assert 0 < t[(0, 0)] < 1e-15 * g_top and np.isfinite(t[(0, 0)])
    assert res.units["sum_rel_err"].max() < 1e-4


# --- closed form: linear branches --------------------------------------------------------------

class LinUnit(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)


class LinNet(nn.Module):
    def __init__(self, n, d):
        super().__init__()
        self.blocks = nn.ModuleList(LinUnit(d) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("lam,mu", [(1.0, 1.0), (0.5, 0.7)])
def test_linear_branches_match_the_sum_over_subsets(lam, mu):
    """x_{l+1} = lam x_l + mu A_l x_l: g^(k) at x_l = sum over k-subsets S of (prod_l M_l)^T w,
    M_l = mu A_l for l in S, lam I otherwise (brute force over all 2^n subsets)."""
    torch.manual_seed(3)
    n, d = 6, 5
    net = LinNet(n, d).double()
    for b in net.blocks:
        nn.init.normal_(b.lin.weight, std=0.6)
    w = torch.randn(d, dtype=torch.float64)
    x = torch.randn(2, d, dtype=torch.float64)
    res = path_components(net, x, loss_fn=lambda out: (out * w).sum(), keep=True,
                          units=list(net.blocks),
                          parts=lambda b: Parts(branch=b.lin, combine=ScaledSum(lam, mu)))
    A = [b.lin.weight.detach() for b in net.blocks]
    for start in (0, 3):
        expect = torch.zeros(n - start + 1, d, dtype=torch.float64)
        for S in itertools.product([0, 1], repeat=n - start):
            P = torch.eye(d, dtype=torch.float64)
            for j, use in enumerate(S):      # x_L = M_{n-1} ... M_start x_start
                P = (mu * A[start + j] if use else lam * torch.eye(d, dtype=torch.float64)) @ P
            expect[sum(S)] += P.T @ w
        got = res.components[start]
        torch.testing.assert_close(got, expect.unsqueeze(1).expand_as(got), rtol=1e-10, atol=1e-12)


# --- Veit's sampling, by hand -----------------------------------------------------------------

def _one_path(m, xs, g_top, subset):
    """The gradient of one path at x_0: units in ``subset`` pass it through their branch (and gate)
    only, the others through their shortcut only; each unit re-run on its recorded input."""
    v = g_top
    for i in reversed(range(len(xs))):
        u, x = m.units()[i], xs[i].detach().requires_grad_()
        z = u.preact(x)
        h = u.shortcut(z if u.shortcut_preact else x)
        r = u.branch(z)
        if i in subset:
            y, _ = u.combine(h.detach(), r, x)
        else:
            y, _ = u.combine(h, r.detach(), x.detach())
        (v,) = torch.autograd.grad(u.post(y), x, v)
    return v


def test_veit_sampling_agrees_with_the_exact_components():
    m = gradflow.create_model("resnet20", width=0.25, unit="original", shortcut="exclusive_gate",
                              gate_bias=-1.0).double()
    x, y = batch(2, dtype=torch.float64)
    xs, grads = unit_inputs_and_grads(m, m.units(), x, y)
    n = len(m.units())
    exact = path_components(m, x, y=y, keep=True).components[0]
    per_k_norm = {}
    for k in (0, 1, n - 1, n):
        paths = [_one_path(m, xs[:-1], grads[-1], set(S)) for S in itertools.combinations(range(n), k)]
        # the sum over every path of length k is g^(k), exactly
        torch.testing.assert_close(sum(paths), exact[k], rtol=1e-9, atol=1e-15)
        per_k_norm[k] = np.mean([p.flatten(1).norm(dim=1).mean().item() for p in paths])
    est = sample_paths(m, x, y=y, ks=[0, 1, n - 1, n], samples=40, seed=0).set_index("k")
    # k = 0 and k = n hold one path each: the estimate is exact
    for k in (0, n):
        assert est.loc[k, "path_norm"] == pytest.approx(per_k_norm[k], rel=1e-9)
        assert est.loc[k, "unbiased_norm"] == pytest.approx(
            exact[k].flatten(1).norm(dim=1).mean().item(), rel=1e-9)
    # k = 1, n - 1: 9 paths each, 40 samples: the sampled mean is close to the mean over all paths
    for k in (1, n - 1):
        assert est.loc[k, "path_norm"] == pytest.approx(per_k_norm[k], rel=0.2)
        assert est.loc[k, "n_paths"] == math.comb(n, k)
        assert est.loc[k, "total"] == pytest.approx(est.loc[k, "path_norm"] * math.comb(n, k))
        # triangle inequality: Veit's total bounds the exact norm (up to sampling noise)
        assert est.loc[k, "total"] > 0.8 * exact[k].flatten(1).norm(dim=1).mean().item()


# --- third-party units -----------------------------------------------------------------------

def test_torchvision_and_timm_components_sum():
    tv = pytest.importorskip("torchvision")
    timm = pytest.importorskip("timm")
    for m in (tv.models.resnet18(num_classes=10), timm.create_model("resnetv2_18", pretrained=False, num_classes=10)):
        x, y = batch(2, 32)
        infos = gradflow.find_units(m)
        _, grads = unit_inputs_and_grads(m, [i.module for i in infos], x, y)
        res = path_components(m, x, y=y, keep=True, max_len=2)
        for i, g in enumerate(grads[:-1]):   # float32: agreement to rounding, relative to the largest entry
            torch.testing.assert_close(res.components[i].sum(0).float(), g, rtol=1e-4,
                                       atol=1e-5 * g.abs().max().item())


# --- tables ---------------------------------------------------------------------------------

def test_path_counts_and_effective_range():
    c = path_counts(54)
    assert c["n_paths"].sum() == pytest.approx(2.0 ** 54)
    assert c.loc[(c.k >= 19) & (c.k <= 35), "share"].sum() > 0.95     # Veit: over 95% of ResNet-110's paths
    t = c.assign(norm=np.where((c.k >= 5) & (c.k <= 7), 1.0, 0.0), unit=0, n_units=54)
    r = effective_range(t.assign(norm=t.norm + np.where(t.k == 6, 10.0, 0.0)), mass=0.9)
    # masses 1, 11, 1: one length holds 11/13 < 0.9, two hold 12/13
    assert (r["lo"], r["hi"]) in {(5, 6), (6, 7)} and r["peak"] == 6 and r["held"] == pytest.approx(12 / 13)
    r = effective_range(t, mass=0.9)
    assert (r["lo"], r["hi"], r["peak"]) == (5, 7, 5) and r["held"] == pytest.approx(1.0)
    with pytest.raises(gradflow.GradflowError, match="mass"):
        effective_range(t, mass=1.5)


def test_bad_input_is_named():
    with pytest.raises(gradflow.GradflowError, match="max_len"):
        PathCarrier(max_len=-1)
    m = gradflow.create_model("resnet20", width=0.25)
    x, y = batch(2)
    with pytest.raises(gradflow.GradflowError, match="ks="):
        sample_paths(m, x, y=y, ks=[99], samples=1)
    with pytest.raises(gradflow.GradflowError, match="loss_fn"):
        path_components(m, x)


@pytest.mark.parametrize("name", ["vit-cifar-tiny", "gpt-tiny"])
def test_transformer_units_split_and_close(name):
    """Blocks with two units each (attention, MLP): the components add up to plain autograd's dE/dx_l."""
    if name not in gradflow.list_models():
        pytest.skip(f"{name} is not in this zoo")
    torch.manual_seed(0)
    m = gradflow.create_model(name).double()
    inp = gradflow.models.registry.model_inputs(name)
    x = torch.randint(0, inp["vocab_size"], (2, 16)) if inp["kind"] == "tokens" else batch(2, dtype=torch.float64)[0]
    res = path_components(m, x, loss_fn=lambda out: (out[0] if isinstance(out, tuple) else out).pow(2).mean(),
                          max_len=2)
    n = len(res.units)
    assert n >= 4 and res.units["sum_rel_err"].max() < 1e-10
    assert res.table.loc[res.table["unit"] == 0, "n_paths"].sum() == 2 ** n


# --- inside gradflow.trace -------------------------------------------------------------------

@pytest.mark.parametrize("kw,max_len", [(dict(), None), (dict(unit="original", shortcut="exclusive_gate",
                                                               gate_bias=-1.0), 2),
                                        (dict(unit="bn_after_addition", shortcut="scale", scale=0.5), 3)])
def test_trace_paths_during_a_real_backward(kw, max_len):
    """tr.paths during the user's own backward: components close on autograd's dE/dx_l and match the
    standalone split (gates by a second combine there, by an alias of x here)."""
    m = gradflow.create_model("resnet20", width=0.25, **kw)     # the tracer reduces in float32
    x, y = batch()
    _, grads = unit_inputs_and_grads(m, m.units(), x, y, seed=0)
    with gradflow.trace(m, paths=True if max_len is None else max_len, keep=("paths",)) as tr:
        F.cross_entropy(m(x), y).backward()
    for i, g in enumerate(grads[:-1]):
        torch.testing.assert_close(tr.tensors[(0, i)]["paths"].sum(0).float(), g, rtol=1e-4,
                                   atol=1e-5 * g.abs().max().item())
    ref = path_components(m, x, y=y, max_len=max_len).table
    got = tr.paths
    assert len(got) == len(ref)
    np.testing.assert_allclose(got["norm"], ref["norm"], rtol=1e-4)
    np.testing.assert_allclose(got["proj"], ref["proj"], rtol=1e-3, atol=1e-6)
    assert list(got["k"]) == list(ref["k"])
    with pytest.raises(gradflow.GradflowError, match="paths"):
        gradflow.trace(m, paths=True, split=False)


def test_probe_reports_the_effective_path_range(tmp_path, capsys):
    """python -m gradflow.probe --paths: the range in the report is the one the exact split gives on the
    probe's own synthetic batch."""
    from gradflow.cli.probe import main
    from gradflow.probe.inputs import synthetic
    out = tmp_path / "p"
    assert main(["--model", "resnet20", "--batch-size", "4", "--paths", "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "90% of sum_k ||g^(k)||" in text
    import json
    p = json.loads((out / "summary.json").read_text())["paths"]["resnet20"]
    torch.manual_seed(0)
    m = gradflow.create_model("resnet20")
    x, y = synthetic(4, 1, 32, 0).batches[0]
    r = effective_range(path_components(m, x, y=y % 10).table)
    assert (p["lo"], p["hi"], p["peak"], p["n_units"]) == (r["lo"], r["hi"], r["peak"], 9)
    assert main(["--model", "resnet20", "--paths", "-3", "--out", str(tmp_path / "q")]) == 2


class _LinRes(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        return x + self.lin(x)


class _Opaque(nn.Module):
    """A residual block torch.fx cannot read (data-dependent control flow): known by input and output only."""

    def __init__(self, c):
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        if x.sum() > -1e30:
            return x + self.lin(x)
        return x


def test_trace_paths_says_where_the_split_stops():
    """A unit without parts: the split stops there, with a warning naming it; the units above keep theirs."""
    torch.manual_seed(0)
    net = nn.Sequential(_LinRes(4), _Opaque(4), _LinRes(4))
    x = torch.randn(2, 4)
    with pytest.warns(RuntimeWarning, match="split stops there"):
        with gradflow.trace(net, units=list(net), paths=True) as tr:     # parts from torch.fx where it can
            net(x).pow(2).sum().backward()
        table = tr.paths
    assert set(table["unit"]) == {2}
