"""torch.fx units in code that splits tensors (chunk, split, tensor_split) or reads their shapes:

every unit's input is a tensor, sums of two pieces of one tensor are not units (said once), and
dE/dx_l matches plain autograd at each unit's input."""
import warnings

import pytest
import torch
import torch.nn as nn

import gradflow

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py



def _module_tensors(model, x):
    """Every module's input and output in a plain forward, and dE/d(each) by autograd."""
    seen = []
    def pre(m, a):
        seen.extend(t for t in a if isinstance(t, torch.Tensor) and t.requires_grad)
    def post(m, a, o):
        if isinstance(o, torch.Tensor) and o.requires_grad:
            seen.append(o)
    hs = [h for m in model.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        loss = model(x).square().sum()
    finally:
        for h in hs:
            h.remove()
    grads = torch.autograd.grad(loss, seen, allow_unused=True)
    return [(t.detach(), g) for t, g in zip(seen, grads) if g is not None]


def check_against_autograd(model, x):
    torch.manual_seed(0)
    with gradflow.trace(model, keep=("x", "grad")) as tr:
        out = model(x)
        out.square().sum().backward()
    ref_out = model(x)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)      # the output is unchanged
    ref = _module_tensors(model, x)
    n, matched = len(tr.infos), 0
    for i in range(n):
        kept = tr.tensors[(0, i)]
        cands = [g for t, g in ref if t.shape == kept["x"].shape and torch.equal(t, kept["x"])]
        if cands:   # dE/dx_l is the gradient of one of the tensors equal to x_l
            matched += 1
            assert any(torch.allclose(kept["grad"], g, rtol=1e-4, atol=1e-6 * g.abs().max().item())
                       for g in cands), tr.infos[i].name
    assert matched == n, f"{n - matched} units' inputs are no module's input or output"
    assert tr.units["grad_norm"].notna().all()
    return tr


def _timm(name, **kw):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=4, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("name,size,kw,units", [
    ("eva02_tiny_patch14_224", 28, dict(img_size=28), 24),        # rotary q/k: x cos + rot(x) sin
    ("res2net50_14w_8s", 32, {}, 16),                            # sp + spx[i] over a split
    ("edgenext_xx_small", 64, {}, 15),                           # chunk, and x + pos_embd(x.shape)
])
def test_timm_models_that_split_tensors_match_autograd(name, size, kw, units):
    m = _timm(name, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = gradflow.find_units(m)
    assert len(found) == units
    check_against_autograd(m, torch.randn(2, 3, size, size))


class SplitSum(nn.Module):
    """Res2Net's pattern by hand: a sum of two pieces of one chunk(), inside a residual block."""

    def __init__(self, d=8):
        super().__init__()
        self.a, self.b = nn.Linear(d // 2, d // 2), nn.Linear(d, d)

    def forward(self, x):
        p, q = self.b(x).chunk(2, dim=1)
        s = self.a(p) + q                     # two pieces of one tensor: not a unit
        return x + torch.cat([s, q], 1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(SplitSum(), SplitSum())

    def forward(self, x):
        return self.blocks(x)


def test_sum_of_two_chunks_is_no_unit_and_is_said():
    torch.manual_seed(0)
    m = Net()
    with pytest.warns(RuntimeWarning, match=r"SplitSum.*\['add'\] add two pieces of one tensor"):
        found = gradflow.find_units(m)
    assert [i.name for i in found] == ["blocks.0", "blocks.1"]
    check_against_autograd(m, torch.randn(3, 8, requires_grad=True))
