"""Units found as the network runs: what counts as a unit, a sub-unit, a sum, and what is refused.

Every number is checked against plain autograd (``zoo_check``/``zoo_oracle``),
never against gradflow's own output.
"""
from __future__ import annotations

import numpy as np
import pytest
import copy
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradflow
from zoo_check import check_network


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot read it; run-time discovery sees it."""

    def __init__(self, d=6, n=3):
        super().__init__()
        self.fs = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d)) for _ in range(n))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for f in self.fs:
            if x.sum() > -1e9:
                x = x + f(x)
        return self.head(x)


class ParallelBlock(nn.Module):
    """x + attn(LN x) + mlp(LN x) (GPT-J, GPT-NeoX, Falcon, PaLM): one unit whose branch is a sum."""

    def __init__(self, d=8):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn, self.mlp = nn.Linear(d, d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.ln(x)
        return x + self.attn(h) + self.mlp(h)


class Nested(nn.Module):
    """A unit whose branch holds a residual addition of its own (ConvNeXt-V2's GRN, Res2Net)."""

    def __init__(self, d=8):
        super().__init__()
        self.a, self.inner, self.b = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = h + self.inner(h)           # a sub-unit
        return x + self.b(h)


class Res(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.f = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.f(x))


class Shared(nn.Module):
    """One layer's weights used at every depth (ALBERT): one module, several units."""

    def __init__(self, d=8, n=3):
        super().__init__()
        self.layer = Res(d)
        self.n = n

    def forward(self, x):
        for _ in range(self.n):
            x = self.layer(x)
        return x


class RepSum(nn.Module):
    """Parallel branch sums without an identity operand (RepVGG's training-time block)."""

    def __init__(self, d=8):
        super().__init__()
        self.k3, self.k1 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return torch.relu(self.k3(x) + self.k1(x))


class PostLN(nn.Module):
    """Post-LN (the original Transformer, BERT): a LayerNorm after each addition, between units."""

    def __init__(self, d=8, n=3):
        super().__init__()
        self.fs = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.lns = nn.ModuleList(nn.LayerNorm(d) for _ in range(n))

    def forward(self, x):
        for f, ln in zip(self.fs, self.lns):
            x = ln(x + torch.tanh(f(x)))
        return x


def _names(model, x):
    return [(u.name, u.role) for u in gradflow.units(model, example=x)]


def test_default_finds_units_fx_cannot_read_and_matches_autograd():
    torch.manual_seed(0)
    m, x = Branchy(), torch.randn(5, 6)
    with gradflow.trace(m) as tr:
        m(x).sum().backward()
    assert [i.found for i in tr.infos] == ["run"] * 3
    assert [i.name for i in tr.infos] == ["add0", "add1", "add2"]
    check_network(Branchy(), (x,))


def test_parallel_residual_block_is_one_unit_whose_branch_is_a_sum():
    torch.manual_seed(0)
    m, x = nn.Sequential(ParallelBlock(), ParallelBlock()), torch.randn(4, 8)
    assert _names(m, x) == [("0", "depth"), ("1", "depth")]
    assert check_network(m, (x,))["directs"] == 2


def test_addition_inside_a_branch_is_a_sub_unit_not_on_the_depth_path():
    torch.manual_seed(0)
    m, x = nn.Sequential(Nested(), Nested()), torch.randn(4, 8)
    listed = gradflow.units(m, example=x)
    assert [(u.name, u.role) for u in listed] == [("0", "sub-unit"), ("0", "depth"), ("1", "sub-unit"),
                                                  ("1", "depth")]
    assert "inside the branch of 0" in listed[0].note
    assert check_network(m, (x,))["units"] == 2


def test_a_module_called_several_times_gives_one_unit_per_call():
    torch.manual_seed(0)
    m, x = Shared(), torch.randn(4, 8)
    assert [n for n, _ in _names(m, x)] == ["layer.call0", "layer.call1", "layer.call2"]
    check_network(m, (x,))


def test_parallel_sums_alone_are_refused_by_name():
    m = nn.Sequential(RepSum(), RepSum())
    with pytest.raises(gradflow.GradflowError, match="no residual unit found in Sequential.*parallel branch sums"):
        gradflow.units(m, example=torch.randn(4, 8))


def test_parameter_free_dependence_is_not_a_unit():
    class TanhGelu(nn.Module):      # the tanh GELU: x + 0.044715 x^3 inside, no parameter between
        def forward(self, x):
            return 0.5 * x * (1.0 + torch.tanh(0.79788 * (x + 0.044715 * torch.pow(x, 3.0))))

    m = nn.Sequential(nn.Linear(8, 8), TanhGelu(), Shared())
    assert [n for n, _ in _names(m, torch.randn(4, 8))] == ["2.layer.call0", "2.layer.call1", "2.layer.call2"]


def test_post_ln_split_is_carried_through_the_layer_norms():
    torch.manual_seed(0)
    got = check_network(PostLN(), (torch.randn(4, 8),))
    assert got["directs"] == 3


def test_in_place_relu_after_the_addition_is_carried_through():
    """ResNet's ``out += identity; relu_(out)``: the ReLU leaves the same tensor with a new graph node.
    The direct term must go through it (it went straight past, as if the ReLU were the identity)."""
    class Block(nn.Module):
        def __init__(self, d=8):
            super().__init__()
            self.f, self.act = nn.Linear(d, d), nn.ReLU(inplace=True)

        def forward(self, x):
            out = self.f(x)
            out += x
            return self.act(out)

    torch.manual_seed(0)
    assert check_network(nn.Sequential(Block(), Block(), Block()), (torch.randn(6, 8),))["directs"] == 3


def test_discovery_leaves_the_forward_and_the_model_as_they_were():
    """Discovery runs on copies, with BatchNorm statistics and the RNG restored: the traced run is
    the run the user asked for."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.f, self.drop = nn.BatchNorm1d(8), nn.Linear(8, 8), nn.Dropout(0.5)

        def forward(self, x):
            x = self.bn(x)
            return x + self.drop(self.f(x))

    torch.manual_seed(0)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    x = torch.randn(6, 8)
    torch.manual_seed(1)
    ref = a(x)
    torch.manual_seed(1)
    with gradflow.trace(b) as tr:
        out = b(x)
        out.sum().backward()
    assert torch.equal(out, ref)
    assert torch.equal(a.bn.running_mean, b.bn.running_mean) and a.bn.num_batches_tracked == b.bn.num_batches_tracked
    assert len(tr.infos) == 1


def test_forward_under_no_grad_records_activations_and_finds_units():
    torch.manual_seed(0)
    m, x = Branchy(), torch.randn(5, 6)
    with gradflow.trace(m) as tr:
        with torch.no_grad():
            m(x)
        m(x).sum().backward()
    df = tr.units
    h = m.fs[0](x) + x
    ev = df[(df["phase"] == "eval") & (df["unit"] == 1)]
    np.testing.assert_allclose(ev["x_norm"].iloc[0], h.norm(dim=1).mean().item(), rtol=1e-5)
    assert df[df["phase"] == "train"]["grad_norm"].notna().all()


def test_units_needs_an_example_for_run_time_units():
    with pytest.raises(gradflow.GradflowError, match="give example="):
        gradflow.units(Branchy())


def test_trained_units_and_cross_entropy_steps():
    """Several steps with an optimizer: every step's dE/dx_l is recorded at every unit."""
    torch.manual_seed(0)
    m = Branchy()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with gradflow.trace(m, optimizer=opt) as tr:
        for _ in range(3):
            F.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad()
    df = tr.units
    assert sorted(df["step"].unique()) == [0, 1, 2]
    assert df[df["unit"] < 3]["grad_norm"].notna().all()


class _CachedBias(torch.nn.Module):
    """timm's LeViT/EfficientFormer attention in miniature: biases gathered by an index buffer,
    cached per device in eval mode (the cache holds a tensor with a graph)."""

    def __init__(self, d=6):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)
        self.biases = torch.nn.Parameter(torch.randn(d))
        self.register_buffer("idx", torch.arange(d).flip(0), persistent=False)
        self.cache = {}

    def forward(self, x):
        if self.training:
            b = self.biases[self.idx]
        else:
            b = self.cache.setdefault(str(x.device), self.biases[self.idx])
        return x + self.lin(torch.tanh(x)) + b


def test_the_discovery_forward_leaves_no_cache_and_bumps_no_saved_buffer():
    torch.manual_seed(0)
    net = torch.nn.Sequential(_CachedBias(), _CachedBias()).eval()
    ref = copy.deepcopy(net)
    x = torch.randn(3, 6)
    xr = x.clone().requires_grad_()
    ref(xr).square().sum().backward()
    xt = x.clone().requires_grad_()
    with gradflow.trace(net, units="run") as tr:
        net(xt).square().sum().backward()      # a cache filled by the discovery forward would fail here
    assert torch.equal(xt.grad, xr.grad)
    assert len(tr.infos) == 2
    for m, r in zip(net, ref):
        assert torch.equal(m.biases.grad, r.biases.grad)
