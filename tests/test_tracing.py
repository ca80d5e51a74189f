"""The tracer against plain autograd: totals, the direct/residual split, sharp edges."""
import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradflow
from gradflow.models import SHORTCUT_TYPES, UNIT_TYPES
from gradflow.tracing import Spectra
from tracing_helpers import (detached_chain, per_sample_norm, timm_detached_forward,
                             torchvision_direct, unit_inputs_and_grads, zoo_direct)


def batch(n=4, size=32, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def traced(model, x, y, seed=0, **kw):
    with gradflow.trace(model, **kw) as tr:
        torch.manual_seed(seed)
        F.cross_entropy(model(x), y).backward()
    return tr


def assert_per_sample(tr, column, expected, rtol=1e-4, atol=1e-8):
    s = tr.samples.sort_values(["unit", "sample"])
    for i, e in enumerate(expected):
        got = s.loc[s["unit"] == i, column].to_numpy()
        np.testing.assert_allclose(got, e.numpy(), rtol=rtol, atol=atol, err_msg=f"{column} at unit {i}")


# --- totals and activations ------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(unit="original"), dict(unit="bn_after_addition", shortcut="exclusive_gate"),
                                dict(shortcut="scale", scale=0.5), dict(unit="relu_only_preact", shortcut="dropout")])
def test_total_gradients_and_activations_match_autograd(kw):
    m = gradflow.create_model("resnet20", **kw)
    x, y = batch()
    tensors, grads = unit_inputs_and_grads(m, m.units(), x, y)
    tr = traced(m, x, y)
    assert_per_sample(tr, "grad_norm", [per_sample_norm(g) for g in grads])
    assert_per_sample(tr, "x_norm", [per_sample_norm(t) for t in tensors])
    top = per_sample_norm(grads[-1])
    assert_per_sample(tr, "grad_ratio", [per_sample_norm(g) / top for g in grads[:-1]])
    df = tr.units
    assert list(df["unit"]) == list(range(len(m.units()) + 1)) and df["is_top"].iloc[-1]
    var = [t.var(unbiased=False).item() for t in tensors]
    np.testing.assert_allclose(df["x_var"], var, rtol=1e-4)
    assert list(df["stage"][:-1]) == [u.stage for u in m.units()]


# --- the direct/residual split ------------------------------------------------------------

@pytest.mark.parametrize("unit,shortcut", list(itertools.product(UNIT_TYPES, SHORTCUT_TYPES)))
def test_direct_term_matches_a_detached_branch_forward(unit, shortcut):
    m = gradflow.create_model("resnet20", unit=unit, shortcut=shortcut)
    x, y = batch()
    directs, g_top = zoo_direct(m, x, y, seed=3)
    _, grads = unit_inputs_and_grads(m, m.units(), x, y, seed=3)
    tr = traced(m, x, y, seed=3)
    assert_per_sample(tr, "direct_norm", [per_sample_norm(d) for d in directs], rtol=1e-4, atol=1e-9)
    assert_per_sample(tr, "residual_norm", [per_sample_norm(g - d) for g, d in zip(grads, directs)],
                      rtol=1e-3, atol=1e-8)
    cos = [F.cosine_similarity(d.flatten(1), (g - d).flatten(1), dim=1) for g, d in zip(grads, directs)]
    assert_per_sample(tr, "cos_direct_residual", cos, rtol=1e-3, atol=1e-4)


def test_identity_direct_term_is_exactly_dE_dxL_within_a_stage():
    m = gradflow.create_model("resnet56")
    x, y = batch()
    df = traced(m, x, y).samples
    last_stage = [i for i, u in enumerate(m.units()) if u.stage == 2][1:]   # after the projection
    ratio = df[df["unit"].isin(last_stage)]["direct_ratio"]
    np.testing.assert_allclose(ratio, 1.0, rtol=1e-6)


@pytest.mark.parametrize("name,scale", [("resnet56", 0.5), ("resnet56", 0.9), ("resnet110", 0.5)])
def test_constant_scaling_direct_term_is_prod_lambda(name, scale):
    # resnet110: 0.5^54 ~ 5.6e-17 of dE/dx_L, whose square is below float32's range
    m = gradflow.create_model(name, shortcut="scale", scale=scale)
    x, y = batch()
    from gradflow.probe.quantities import Structure
    tr = traced(m, x, y, quantities=[Structure()])
    df = tr.units
    L = len(m.units())
    last_stage = [i for i, u in enumerate(m.units()) if u.stage == 2][1:]
    for i in last_stage:
        np.testing.assert_allclose(df.loc[i, "direct_ratio"], scale ** (L - i), rtol=1e-5)
    # every covered unit: direct = prod(lambda) up to the next projection, times its direct term
    joined = gradflow.theory.predict_direct(df)
    covered = joined["pred_basis"] == "eq. (8)"
    assert covered.sum() == L - 2       # the two projection units are not covered
    np.testing.assert_allclose(joined.loc[covered, "direct_vs_pred"], 1.0, rtol=1e-5)
    s = tr.summary()
    assert abs(s["direct_rate"]["slope"] - math.log(scale)) < 1e-5
    assert s["direct_obeys_closed_form"]


@pytest.mark.parametrize("shortcut", ["identity", "scale", "dropout", "conv"])
def test_with_zero_branches_direct_equals_total(shortcut):
    m = gradflow.create_model("resnet20", unit="original", shortcut=shortcut)
    for u in m.units():
        last = [mod for mod in u.branch if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d))][-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias) if last.bias is not None else None
    x, y = batch()
    s = traced(m, x, y).samples
    s = s[s["unit"] < len(m.units())]
    np.testing.assert_allclose(s["direct_norm"], s["grad_norm"], rtol=1e-5)
    assert (s["residual_norm"] <= 1e-6 * s["grad_norm"]).all()


def test_cancel_flag_counts_samples_where_total_vanishes():
    m = gradflow.create_model("resnet20")
    x, y = batch()
    tr = traced(m, x, y, cancel_tol=1e9)      # every sample "cancels" at this tolerance
    assert (tr.units["cancel_frac"].dropna() == 1.0).all()
    tr = traced(m, x, y, cancel_tol=0.0)
    assert (tr.units["cancel_frac"].dropna() == 0.0).all()


# --- third-party networks ------------------------------------------------------------------

# torchvision and timm are skipped where a test needs them, not at import: a module-level
# importorskip would skip every test of this file.

def _same_forward(model, x):
    model.eval()
    ref = model(x)
    with gradflow.trace(model, split=False):
        out = model(x)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("resnet50", 64), ("resnext50_32x4d", 32),
                                       ("wide_resnet50_2", 32)])
def test_torchvision_units_found_and_exact(name, size):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = getattr(tv.models, name)(num_classes=10)
    blocks = [b for layer in (m.layer1, m.layer2, m.layer3, m.layer4) for b in layer]
    infos = gradflow.find_units(m)
    assert [i.module for i in infos] == blocks
    assert [i.stage for i in infos] == [s for s, layer in enumerate((m.layer1, m.layer2, m.layer3, m.layer4)) for _ in layer]
    x, y = batch(2, size)
    _same_forward(m, x)
    m.train()
    tensors, grads = unit_inputs_and_grads(m, blocks, x, y)
    directs, _ = torchvision_direct(m, x, y, blocks)
    tr = traced(m, x, y)
    assert_per_sample(tr, "grad_norm", [per_sample_norm(g) for g in grads])
    assert_per_sample(tr, "direct_norm", [per_sample_norm(d) for d in directs], rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("name", ["resnet18", "resnet26d", "resnetv2_50", "resnetv2_50d_gn", "resnetv2_18"])
def test_timm_units_found_and_exact(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=10)
    infos = gradflow.find_units(m)
    assert infos and all(i.parts is not None for i in infos)
    x, y = batch(2, 64)
    _same_forward(m, x)
    m.train()
    tensors, grads = unit_inputs_and_grads(m, [i.module for i in infos], x, y)
    tr = traced(m, x, y)
    assert_per_sample(tr, "grad_norm", [per_sample_norm(g) for g in grads], rtol=1e-4, atol=1e-10)
    blocks = [i.module for i in infos]
    if "gn" not in name:   # the v2 non-pre-act block is covered by the totals above
        directs = detached_chain(blocks, tensors[:-1], grads[-1], timm_detached_forward)
        assert_per_sample(tr, "direct_norm", [per_sample_norm(d) for d in directs], rtol=1e-4, atol=1e-10)


# --- user networks ------------------------------------------------------------------------

class MyBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.residual = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.skip = nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.residual(x)


class MyNet(nn.Module):
    def __init__(self, c=4, n=3):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*[MyBlock(c) for _ in range(n)])
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _check_user(m, tr, x, y):
    tensors, grads = unit_inputs_and_grads(m, list(m.blocks), x, y)
    assert_per_sample(tr, "grad_norm", [per_sample_norm(g) for g in grads])


def test_user_network_found_by_fx():
    m = MyNet()
    infos = gradflow.find_units(m)
    assert [i.name for i in infos] == ["blocks.0", "blocks.1", "blocks.2"]
    x, y = batch(2, 8)
    tr = traced(m, x, y)
    _check_user(m, tr, x, y)
    # parts read from the graph's addition; identity shortcuts, so direct == dE/dx_L (eq. 5)
    assert all(i.found == "fx" and i.split for i in infos)
    np.testing.assert_allclose(tr.samples["direct_ratio"], 1.0, rtol=1e-6)


def test_user_network_declared_by_pattern_with_parts_gets_the_split():
    m = MyNet()
    x, y = batch(2, 8)
    tr = traced(m, x, y, units="blocks.*", parts={"shortcut": None, "branch": "residual"})
    _check_user(m, tr, x, y)
    # identity shortcuts, identity post: direct == dE/dx_L at every unit (eq. 5)
    np.testing.assert_allclose(tr.samples["direct_ratio"], 1.0, rtol=1e-6)


def test_user_network_declared_by_module_list():
    m = MyNet()
    x, y = batch(2, 8)
    tr = traced(m, x, y, units=[m.blocks[0], m.blocks[2]])
    assert list(tr.units["name"][:-1]) == ["blocks.0", "blocks.2"]


def test_network_without_units_gets_a_clear_error():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())
    with pytest.raises(gradflow.GradflowError, match="no residual unit found"):
        with gradflow.trace(m):     # found (or not) as it runs, on the first forward
            m(torch.randn(1, 3, 8, 8))
    with pytest.raises(gradflow.GradflowError, match="matches no module"):
        gradflow.trace(MyNet(), units="nothing.*")


def test_bad_parts_declaration_names_the_submodules():
    with pytest.raises(gradflow.GradflowError, match="residual"):
        m = MyNet()
        x, y = batch(2, 8)
        traced(m, x, y, units="blocks.*", parts={"branch": "resid"})


# --- sharp edges ------------------------------------------------------------------------

def _hook_free(model):
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
        assert not mod._backward_hooks and "forward" not in mod.__dict__


def test_model_is_left_exactly_as_found():
    m = gradflow.create_model("resnet20", shortcut="dropout")
    m2 = copy.deepcopy(m)
    x, y = batch()
    torch.manual_seed(5)
    F.cross_entropy(m2(x), y).backward()
    after_plain = torch.rand(3)
    traced(m, x, y, seed=5)
    after_traced = torch.rand(3)
    assert torch.equal(after_plain, after_traced)                     # same RNG stream
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k                                    # same BN running stats
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p.grad, q.grad)                             # same gradients
    _hook_free(m)


def test_hooks_removed_after_an_exception():
    m = gradflow.create_model("resnet20")
    with pytest.raises(RuntimeError, match="boom"):
        with gradflow.trace(m):
            m(batch()[0])
            raise RuntimeError("boom")
    _hook_free(m)


def test_eval_mode_and_no_grad():
    m = gradflow.create_model("resnet20").eval()
    x, y = batch()
    tensors, grads = unit_inputs_and_grads(m, m.units(), x, y)
    tr = traced(m, x, y)
    assert_per_sample(tr, "grad_norm", [per_sample_norm(g) for g in grads])
    with gradflow.trace(m) as tr, torch.no_grad():
        m(x)
    df = tr.units
    assert df["x_norm"].notna().all()
    # no backward: the gradient columns are there, NaN, not silently absent
    for c in ("grad_norm", "grad_ratio", "direct_norm", "direct_ratio", "residual_norm", "cancel_frac"):
        assert c in df and df[c].isna().all(), c


def test_bf16_autocast_and_channels_last():
    m = gradflow.create_model("resnet20").to(memory_format=torch.channels_last)
    x, y = batch()
    x = x.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tensors, grads = unit_inputs_and_grads(m, m.units(), x, y)
        tr = traced(m, x, y)
    assert_per_sample(tr, "grad_norm", [per_sample_norm(g.float()) for g in grads], rtol=2e-2, atol=1e-6)
    assert tr.units["direct_ratio"].notna().all()


def test_compiled_model_gets_a_clear_error():
    m = torch.compile(gradflow.create_model("resnet20"))
    with pytest.raises(gradflow.GradflowError, match="_orig_mod"):
        gradflow.trace(m)


def test_first_unit_input_without_grad_and_modules_called_twice():
    m = gradflow.create_model("resnet20")
    u0, u1 = m.stages[0][0], m.stages[0][1]
    net = nn.Sequential(u0, u1, u0)          # u0 is called twice; the input needs no grad
    x = torch.randn(2, 16, 8, 8)
    with gradflow.trace(net) as tr:
        net(x).square().sum().backward()
    df = tr.units
    assert list(df["name"][:-1]) == ["0", "1", "0"]
    xi = x.clone().requires_grad_()
    a = u0(xi); b = u1(a); c = u0(b)
    g = torch.autograd.grad(c.square().sum(), [xi, a, b])
    np.testing.assert_allclose(df["grad_norm"][:3], [per_sample_norm(t).mean().item() for t in g], rtol=1e-5)


def test_schedule_records_only_chosen_steps():
    m = gradflow.create_model("resnet20")
    x, y = batch()
    with gradflow.trace(m, schedule=gradflow.tracing.every(2)) as tr:
        for _ in range(5):
            F.cross_entropy(m(x), y).backward()
    assert sorted(tr.units["step"].unique()) == [0, 2, 4]


def test_keep_full_tensors_on_request():
    m = gradflow.create_model("resnet20")
    x, y = batch()
    tensors, grads = unit_inputs_and_grads(m, m.units(), x, y)
    tr = traced(m, x, y, keep=("x", "grad"))
    torch.testing.assert_close(tr.tensors[(0, 3)]["grad"], grads[3])
    torch.testing.assert_close(tr.tensors[(0, 3)]["x"], tensors[3].detach())


# --- Jacobian spectra -------------------------------------------------------------------

@pytest.mark.usefixtures("one_thread")   # 1,800 tiny jvp/vjp products: 2 threads spin 5x slower
def test_spectra_match_dense_jacobians():
    m = gradflow.create_model("resnet20", unit="original", shortcut="scale", scale=0.5)
    net = m.stages[0][:2]
    x = torch.randn(2, 16, 3, 3)
    with gradflow.trace(net, quantities=[Spectra(150)]) as tr:
        net(x).sum().backward()
    df = tr.units
    u = net[1]
    x1 = net[0](x).detach()

    def dense(f, inp):
        J = torch.autograd.functional.jacobian(f, inp).reshape(inp.numel(), -1)
        return J
    J = dense(u, x1)
    Jb = dense(lambda t: u.branch(u.preact(t)), x1)
    I = torch.eye(J.shape[0])
    np.testing.assert_allclose(df.loc[1, "sigma_unit"], torch.linalg.matrix_norm(J, 2).item(), rtol=1e-3)
    np.testing.assert_allclose(df.loc[1, "sigma_branch"], torch.linalg.matrix_norm(Jb, 2).item(), rtol=1e-3)
    np.testing.assert_allclose(df.loc[1, "dist_identity"], torch.linalg.matrix_norm(J - I, 2).item(), rtol=1e-3)


def test_units_called_directly_form_steps():
    m = gradflow.create_model("resnet20")
    x = torch.randn(2, 3, 32, 32)
    with gradflow.trace(m) as tr:
        m.forward_features(x).sum().backward()          # not through model.forward
        tr.next_step()
        m.forward_features(x).sum().backward()
    df = tr.units
    assert sorted(df["step"].unique()) == [0, 1] and len(df) == 2 * (len(m.units()) + 1)
    assert df["grad_norm"].notna().all()
