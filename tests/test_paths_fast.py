"""The fast route of the path split (all components through a unit in one product per graph node,
from saved tensors: gradflow/tracing/paths/vjp.py) against the autograd route and plain autograd."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import get_gradient_edge

import gradflow
from gradflow.models.resnet import cifar_resnet
from gradflow.tracing.paths.components import path_components, record
from gradflow.tracing.paths.carrier import PathCarrier
from gradflow.tracing.paths.vjp import compile_vjp
from tracing_helpers import unit_inputs_and_grads

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py




def batch(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def model(kind: str, train: bool):
    torch.manual_seed(0)
    if kind == "bottleneck":       # 1x1-3x3-1x1 branches, projection shortcuts at every stage's first unit
        m = cifar_resnet(11, "bottleneck", width=0.25)
    else:
        kw = {"full_preact": {}, "original": dict(unit="original"),
              "projection": dict(unit="bn_after_addition", shortcut="conv"),
              "relu_before": dict(unit="relu_before_addition"),
              "scale": dict(shortcut="scale", scale=0.5, scale_branch=True)}[kind]
        m = gradflow.create_model("resnet20", width=0.25, **kw)
    m = m.double().train(train)
    if not train:   # running statistics that differ from the batch's, so eval mode is its own case
        for b in m.modules():
            if isinstance(b, torch.nn.BatchNorm2d):
                b.running_mean.uniform_(-0.5, 0.5)
                b.running_var.uniform_(0.5, 2.0)
    return m


@pytest.mark.parametrize("train", [True, False], ids=["bn_train", "bn_eval"])
@pytest.mark.parametrize("kind", ["full_preact", "original", "projection", "bottleneck", "relu_before", "scale"])
def test_fast_route_equals_autograd_route_and_closes(kind, train, monkeypatch):
    """Every unit on the fast route; its components equal the autograd route's (one autograd.grad per
    component) and sum to plain autograd's dE/dx_l; with and without a remainder, and with chunks of
    one entry (chunk boundaries inside the stack)."""
    m = model(kind, train)
    x, y = batch()
    _, grads = unit_inputs_and_grads(m, m.units(), x, y)
    ref = {ml: path_components(m, x, y=y, keep=True, max_len=ml, fast=False) for ml in (None, 1)}
    for chunk in (PathCarrier.chunk_elems, 1):
        monkeypatch.setattr(PathCarrier, "chunk_elems", chunk)
        for ml in (None, 1):
            res = path_components(m, x, y=y, keep=True, max_len=ml)
            assert set(res.units["vjp"]) == {"fast"}
            assert set(ref[ml].units["vjp"]) == {"autograd: fast=False"}
            for i, comp in res.components.items():
                torch.testing.assert_close(comp, ref[ml].components[i], rtol=1e-10, atol=1e-13 * comp.abs().max())
                torch.testing.assert_close(comp.sum(0), grads[i], rtol=1e-10, atol=1e-14)
            assert res.units["sum_rel_err"].max() < 1e-10
            cols = ["unit", "k", "norm", "norm_q50", "share", "proj", "n_paths"]
            torch.testing.assert_close(torch.tensor(res.table[cols].to_numpy()),
                                       torch.tensor(ref[ml].table[cols].to_numpy()), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("train", [True, False], ids=["bn_train", "bn_eval"])
@pytest.mark.parametrize("kind", ["full_preact", "original", "bottleneck"])
def test_compiled_products_equal_autograd_per_cotangent(kind, train):
    """One compiled product for M cotangents equals M calls of torch.autograd.grad, for each unit's
    branch, shortcut and (where there is one) after-addition part."""
    m = model(kind, train)
    x, y = batch(2)
    rec = record(m, x, lambda out: F.cross_entropy(out, y))
    gen = torch.Generator().manual_seed(0)
    for call in rec.calls:
        pairs = [(call.r, call.x), (call.h, call.x)] + ([(call.out, call.r)] if not call.plain_sum else [])
        for out, inp in pairs:
            p = compile_vjp([get_gradient_edge(out)], [get_gradient_edge(inp)], channels_last=True)
            assert not isinstance(p, str), p
            gs = torch.randn((4,) + out.shape, generator=gen, dtype=out.dtype)
            (got,) = p.run([gs])
            want = torch.stack([torch.autograd.grad(out, inp, g, retain_graph=True)[0] for g in gs])
            torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)


def test_units_without_rules_take_the_autograd_route_and_say_why():
    """Zero-padded shortcuts (option A) and the dropout shortcut's mask: the route names the node;
    the components are still exact."""
    for kw, why in ((dict(downsample="pad"), "ConstantPadNdBackward0"),
                    (dict(shortcut="dropout"), "MulBackward0 with a tensor factor")):
        m = gradflow.create_model("resnet20", width=0.25, **kw).double()
        x, y = batch()
        torch.manual_seed(0)
        _, grads = unit_inputs_and_grads(m, m.units(), x, y, seed=0)
        torch.manual_seed(0)
        res = path_components(m, x, y=y, keep=True)
        slow = res.units[res.units["vjp"] != "fast"]
        assert len(slow) > 0 and all(why in r for r in slow["vjp"])
        for i, comp in res.components.items():
            torch.testing.assert_close(comp.sum(0), grads[i], rtol=1e-10, atol=1e-14)


def test_fast_route_inside_trace_matches_plain_autograd():
    """gradflow.trace(paths=True) takes the same route during the user's own backward (float32)."""
    m = gradflow.create_model("resnet20", width=0.25, unit="original")
    x, y = batch()
    x = x.float()
    _, grads = unit_inputs_and_grads(m, m.units(), x, y, seed=0)
    with gradflow.trace(m, paths=2, keep=("paths",)) as tr:
        F.cross_entropy(m(x), y).backward()
    assert set(tr._paths.carrier.route.values()) == {"fast"}
    for i, g in enumerate(grads[:-1]):
        torch.testing.assert_close(tr.tensors[(0, i)]["paths"].sum(0).float(), g, rtol=1e-4,
                                   atol=1e-5 * g.abs().max().item())


def test_compile_says_what_it_cannot_batch_and_is_exact_on_what_it_can():
    """A broadcast operand (autograd sums its gradient down; a rule would not) and a node without a
    rule are refused with the reason; a DAG of known nodes equals autograd per cotangent."""
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    e = get_gradient_edge
    y = x * 2 + torch.relu(x.mean((2, 3), keepdim=True))
    assert compile_vjp([e(y)], [e(x)]) == "AddBackward0 with a broadcast operand"
    y = torch.sigmoid(x) + x
    assert "SigmoidBackward0" in compile_vjp([e(y)], [e(x)])
    bn = torch.nn.BatchNorm2d(3).double()
    y = 0.5 * torch.relu(bn(x)) - x.view(2, 48).view(2, 3, 4, 4) + bn(torch.relu(x))   # x feeds four paths
    p = compile_vjp([e(y)], [e(x)])
    gs = torch.randn(5, *y.shape, dtype=torch.float64)
    (got,) = p.run([gs])
    want = torch.stack([torch.autograd.grad(y, x, g, retain_graph=True)[0] for g in gs])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_torchvision_and_timm_resnets_take_the_fast_route():
    """Their blocks are convolutions, BatchNorm, ReLU and sums (plus downsample projections): all fast,
    and equal to the autograd route."""
    tv = pytest.importorskip("torchvision")
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    for m in (tv.models.resnet18(num_classes=10), timm.create_model("resnetv2_18", pretrained=False, num_classes=10)):
        m = m.double()
        x, y = batch(2)
        fast = path_components(m, x, y=y, keep=True, max_len=2)
        slow = path_components(m, x, y=y, keep=True, max_len=2, fast=False)
        assert set(fast.units["vjp"]) == {"fast"}
        for i, comp in fast.components.items():
            torch.testing.assert_close(comp, slow.components[i], rtol=1e-10, atol=1e-13 * comp.abs().max())
        assert fast.units["sum_rel_err"].max() < 1e-10
