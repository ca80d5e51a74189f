"""Every unit split however it is called, parts checked, measurements as plug-ins.

Oracles: plain autograd at each unit's input, and the same network with every
residual branch detached, whose dE/dx_l is the direct term.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradflow
from gradflow.tracing.parts import Block, Parts
from tracing_helpers import ResMLP, TwoAddBlock, grads_at_inputs, per_sample_norm


def data(n=4, shape=(8,), classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def set_detached(model, on):
    for m in model.modules():
        if hasattr(m, "detach_branch"):
            m.detach_branch = on


def inputs_grads(inputs, run):
    xs = []
    hs = [m.register_forward_pre_hook(lambda m, a: xs.append(a[0])) for m in inputs]
    try:
        loss = run()
    finally:
        for h in hs:
            h.remove()
    return list(torch.autograd.grad(loss, xs))


def oracle(model, inputs, run):
    """(dE/dx_l at each unit input, the direct terms) by autograd on the plain and detached networks."""
    g = inputs_grads(inputs, run)
    set_detached(model, True)
    try:
        d = inputs_grads(inputs, run)
    finally:
        set_detached(model, False)
    return g, d


def check(tr, column, expected, rtol=1e-5, atol=1e-9):
    s = tr.samples
    s = s[s["backward"] == 0].sort_values(["unit", "sample"])
    for i, e in enumerate(expected):
        got = s.loc[s["unit"] == i, column].to_numpy()
        np.testing.assert_allclose(got, per_sample_norm(e).numpy(), rtol=rtol, atol=atol,
                                   err_msg=f"{column} at unit {i}")


# --- found through torch.fx, split with no declaration ------------------------------------------

class SeqNet(nn.Module):
    def __init__(self, post_ln=False, d=8, n=2):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList([TwoAddBlock(d, post_ln) for _ in range(n)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):          # [B, T, d]
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(1))


def test_hand_written_mlp_found_by_fx_gets_the_split():
    torch.manual_seed(0)
    m = ResMLP()
    infos = gradflow.find_units(m)
    assert [(i.name, i.found, i.split) for i in infos] == [(f"blocks.{k}", "fx", True) for k in range(3)]
    x, y = data()
    g, d = oracle(m, list(m.blocks), lambda: F.cross_entropy(m(x), y))
    with gradflow.trace(m) as tr:
        F.cross_entropy(m(x), y).backward()
    check(tr, "grad_norm", g)
    check(tr, "direct_norm", d)
    check(tr, "residual_norm", [a - b for a, b in zip(g, d)], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("post_ln", [False, True])
def test_two_additions_in_one_module_are_two_units(post_ln):
    torch.manual_seed(0)
    m = SeqNet(post_ln)
    infos = gradflow.find_units(m)
    assert [i.name for i in infos] == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    assert all(i.found == "fx" and i.split for i in infos)
    x, y = data(shape=(5, 8))
    # unit inputs: pre-LN x_l enters ln1/ln2; post-LN x_l enters attn/mlp directly
    inputs = [mod for b in m.blocks for mod in ((b.attn, b.mlp) if post_ln else (b.ln1, b.ln2))]
    g, d = oracle(m, inputs, lambda: F.cross_entropy(m(x), y))
    with gradflow.trace(m) as tr:
        F.cross_entropy(m(x), y).backward()
    df = tr.units
    assert list(df["name"][:-1]) == [i.name for i in infos] and df["stage"].nunique() == 1
    check(tr, "grad_norm", g)
    check(tr, "direct_norm", d, rtol=1e-4)          # post-LN: through every LN's Jacobian
    if not post_ln:                                   # pre-LN: the direct term is dE/dx_L (eq. 5)
        np.testing.assert_allclose(tr.samples["direct_ratio"], 1.0, rtol=1e-6)


def test_fx_failure_reason_is_shown():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:             # data-dependent control flow: torch.fx cannot trace it
                return x + self.f(x)
            return x

    with pytest.raises(gradflow.GradflowError, match="torch.fx could not read this model: .*control flow"):
        gradflow.trace(Branchy(), units="fx")


# --- extra call arguments, the unit protocol, several units in one module ------------------------

class MaskedBlock(nn.Module):
    """A unit called with an extra positional argument and a keyword argument."""

    def __init__(self, d):
        super().__init__()
        self.f = MaskedBranch(d)
        self.detach_branch = False

    def forward(self, x, gain, mask=None):
        r = self.f(x, gain, mask=mask)
        return x + (r.detach() if self.detach_branch else r)


class MaskedBranch(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, z, gain, mask=None):
        out = torch.tanh(self.lin(z)) * gain
        return out * mask if mask is not None else out


class MaskedNet(nn.Module):
    def __init__(self, d=8, n=3):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList([MaskedBlock(d) for _ in range(n)])
        self.head = nn.Linear(d, 3)

    def forward(self, x, mask):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x, 0.5, mask=mask)
        return self.head(x)


@pytest.mark.parametrize("how", ["declared", "fx"])
def test_units_called_with_extra_args_and_kwargs_are_split(how):
    torch.manual_seed(0)
    m = MaskedNet()
    x, y = data()
    mask = (torch.rand(4, 8, generator=torch.Generator().manual_seed(3)) > 0.3).float()
    kw = dict(units="blocks.*", parts={"branch": "f"}) if how == "declared" else dict(units="blocks.*")
    g, d = oracle(m, list(m.blocks), lambda: F.cross_entropy(m(x, mask), y))
    with gradflow.trace(m, **kw) as tr:
        F.cross_entropy(m(x, mask), y).backward()
    assert all(i.split for i in tr.infos) and {i.found for i in tr.infos} == {how}
    check(tr, "grad_norm", g)
    check(tr, "direct_norm", d)
    check(tr, "r_norm", [m.blocks[0].f(m.inp(x), 0.5, mask=mask)], rtol=1e-5)   # the branch saw both arguments


class TwoUnitModule(nn.Module):
    """The unit protocol with a Block: two units, a keyword argument, a tuple output."""

    def __init__(self, d, stage=None):
        super().__init__()
        self.stage = stage
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def parts(self):
        def attn(z, bias=0.0):
            return self.a(z) + bias

        def forward(run, x, bias=0.0):
            h = run.unit(0, Parts(branch=attn, preact=self.ln1, modules=(self.ln1, self.a)), x, bias=bias)
            h = run.unit(1, Parts(branch=self.b, preact=self.ln2), h)
            return h, {"extra": bias}
        return Block(("first", "second"), forward)

    def forward(self, x, bias=0.0):
        from gradflow.tracing.parts import PLAIN
        return self.parts().forward(PLAIN, x, bias=bias)


def test_protocol_block_with_two_units_kwargs_and_a_tuple_output():
    torch.manual_seed(0)
    d = 8
    net = nn.ModuleList([TwoUnitModule(d), TwoUnitModule(d)])
    head = nn.Linear(d, 3)
    x, y = data()
    x.requires_grad_()

    def run():
        h = x
        for mod in net:
            h, extra = mod(h, bias=0.1)
        return F.cross_entropy(head(h), y)
    inputs = [mod for u in net for mod in (u.ln1, u.ln2)]
    _, g = grads_at_inputs(inputs, run, top=inputs[-1])
    holder = nn.Module()
    holder.net = net
    with gradflow.trace(holder, units=list(net)) as tr:
        run().backward()
    assert [i.name for i in tr.infos] == ["net.0.first", "net.0.second", "net.1.first", "net.1.second"]
    assert {i.found for i in tr.infos} == {"zoo"}
    check(tr, "grad_norm", g[:4])
    np.testing.assert_allclose(tr.samples["direct_ratio"], 1.0, rtol=1e-6)
    w = tr.units[~tr.units["is_top"]]["weight_grad_norm"].to_numpy()
    want = [torch.cat([p.grad.flatten() for p in ps]).norm().item()
            for u in net for ps in ((*u.ln1.parameters(), *u.a.parameters()),
                                    (*u.ln2.parameters(), *u.b.parameters()))]
    np.testing.assert_allclose(w, want, rtol=1e-5)


# --- parts checked, never trusted -----------------------------------------------------------------

def test_wrong_parts_are_a_clear_error_and_leave_the_model_as_found():
    torch.manual_seed(0)
    m = SeqNet()
    x, y = data(shape=(5, 8))
    before = m(x).detach().clone()
    with pytest.raises(gradflow.GradflowError,
                       match=r"unit 'blocks.0'.*preact='ln2'.*branch='mlp'.*differs .* by up to \d"):
        with gradflow.trace(m, units="blocks.*", parts={"branch": "mlp", "preact": "ln2"}):
            m(x)
    assert torch.equal(m(x), before)
    assert all("forward" not in mod.__dict__ for mod in m.modules())


def test_parts_check_leaves_bn_stats_and_rng_alone():
    m = gradflow.create_model("resnet20", shortcut="dropout")   # BN and dropout in every unit
    m2 = copy.deepcopy(m)
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(4)
    plain, after_plain = m2(x), torch.rand(2)
    torch.manual_seed(4)
    with gradflow.trace(m, split=False):     # the first call of every unit is checked
        traced = m(x)
    assert torch.equal(traced, plain) and torch.equal(torch.rand(2), after_plain)
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


# --- the table of units, summaries ----------------------------------------------------------------

def test_units_table_lists_how_each_unit_was_found():
    m = SeqNet()
    x, _ = data(shape=(5, 8))
    t = gradflow.units(m, example=x)
    text = str(t)
    assert text.splitlines()[0].split() == ["name", "kind", "stage", "found", "role", "split", "x_shape"]
    assert "blocks.1.mlp" in text and " run " in text and "5x8" in text and "4 units, 4 with" in text
    assert list(t.frame()["found"]) == ["run"] * 4
    assert list(gradflow.units(m, example=x, units="fx").frame()["found"]) == ["fx"] * 4
    z = gradflow.create_model("resnet20")
    with gradflow.trace(z) as tr:
        pass
    rep = repr(tr)
    assert "zoo" in rep and "layer" not in rep and "Conv2d" not in rep and "9 units" in rep
    opaque = gradflow.units(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), units="0")
    assert "no split" in str(opaque)


def test_summary_fits_each_step_and_returns_plain_numbers():
    m = gradflow.create_model("resnet20", shortcut="scale", scale=0.5)
    x = torch.randn(2, 3, 8, 8)
    with gradflow.trace(m) as tr:
        for _ in range(2):
            m(x).sum().backward()
    per = tr.summary()
    assert sorted(per) == [0, 1]
    one = tr.summary(step=1)
    assert one == per[1]
    from gradflow.theory import summarize
    df = tr.units
    assert one["direct_rate"]["slope"] == pytest.approx(summarize(df[df["step"] == 1])["direct_rate"]["slope"])
    pooled = tr.summary(pool=True)
    assert pooled["pooled_steps"] == 2 and pooled["steps"] == 2

    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(k)
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        else:
            assert v is None or type(v) in (int, float, bool, str), type(v)
    walk(per)
    with pytest.raises(gradflow.GradflowError, match="no such recorded step"):
        tr.summary(step=7)


# --- measurements as plug-ins ----------------------------------------------------------------------

class XKurtosis(gradflow.tracing.Quantity):
    columns = ("x_kurtosis",)
    top = True
    early = True     # reads only t.x: computed as the unit is entered

    def forward(self, t):
        x = t.x.detach().flatten(1).float()
        z = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
        return {"x_kurtosis": z.pow(4).mean(1)}


class GradMax(gradflow.tracing.Quantity):
    columns = ("grad_max",)
    needs = "grad"

    def backward(self, t):
        return {"grad_max": t.grad.detach().flatten(1).abs().amax(1)}


def test_user_quantities_forward_and_backward():
    torch.manual_seed(0)
    m = ResMLP(d=16)
    x, y = data(n=6, shape=(16,))
    ts, g = grads_at_inputs(list(m.blocks), lambda: F.cross_entropy(m(x), y))
    with gradflow.trace(m, quantities=[XKurtosis(), GradMax()]) as tr:
        F.cross_entropy(m(x), y).backward()
    s = tr.samples.sort_values(["unit", "sample"])
    for i, t in enumerate(ts):
        v = t.detach().numpy()
        xs = (v - v.mean(1, keepdims=True)) / v.std(1, ddof=1, keepdims=True)
        np.testing.assert_allclose(s.loc[s["unit"] == i, "x_kurtosis"], (xs ** 4).mean(1), rtol=1e-4)
        if i < len(g) - 1:
            np.testing.assert_allclose(s.loc[s["unit"] == i, "grad_max"],
                                       g[i].abs().amax(1).numpy(), rtol=1e-6)
    assert {"x_kurtosis", "x_kurtosis_q50", "grad_max_std"} <= set(tr.units.columns)
    with gradflow.trace(m, quantities=("cheap",)) as tr:
        F.cross_entropy(m(x), y).backward()
    assert "grad_norm" in tr.units and "direct_norm" not in tr.units and "h_norm" not in tr.units
    with pytest.raises(gradflow.GradflowError, match="Quantity"):
        gradflow.trace(m, quantities=[object()])


def test_zoo_forward_is_its_parts_so_only_other_forwards_are_checked():
    from gradflow.errors import GradflowError
    from gradflow.models.units import ResidualUnit
    from gradflow.tracing.parts import forward_runs_parts, run_parts

    m = gradflow.create_model("resnet20")
    unit = m.units()[0]
    assert forward_runs_parts(unit)   # forward == run_parts(parts()): a check would compare it with itself

    class Doubled(ResidualUnit):       # a subclass with a forward of its own is checked as usual
        def forward(self, x):
            return 2 * run_parts(self.parts(), x)

    unit.__class__ = Doubled
    assert not forward_runs_parts(unit)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    with pytest.raises(GradflowError, match="differs from the module's own forward"):
        with gradflow.trace(m):
            m(x)
    unit.__class__ = ResidualUnit
    unit.forward = lambda x: run_parts(unit.parts(), x)   # a replaced forward: checked too
    assert not forward_runs_parts(unit)


class _InPlaceBlock(nn.Module):
    """Known only by input and output: its branch ReLUs the unit's input in place."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        h = x.clone()
        return h + self.lin(x.relu_())   # x_l itself is overwritten by the branch


@pytest.mark.parametrize("quantities,split", [(None, True), (("cheap",), False)])
def test_a_unit_that_overwrites_its_input_is_measured_at_the_input_it_was_given(quantities, split):
    """x_l, dE/dx_l (and the split) are of the tensor the unit was given, not of what it left
    in its place: against x_l and dE/dx_l taken by forward pre-hooks on an untraced run."""
    torch.manual_seed(0)
    m = ResMLP(n=2, block=_InPlaceBlock)
    x, y = data(n=5, shape=(8,))
    seen, grads = [], {}

    def pre(mod, a):
        seen.append(a[0].detach().clone())
        a[0].register_hook(lambda g, i=len(seen) - 1: grads.__setitem__(i, g.detach().clone()))
    hs = [b.register_forward_pre_hook(pre) for b in m.blocks]
    F.cross_entropy(m(x), y).backward()
    for h in hs:
        h.remove()
    with gradflow.trace(m, units=list(m.blocks), quantities=quantities, split=split, keep=("x",)) as tr:
        F.cross_entropy(m(x), y).backward()
    s = tr.samples.sort_values(["unit", "sample"])
    for i, t in enumerate(seen):
        torch.testing.assert_close(tr.tensors[(0, i)]["x"], t)
        np.testing.assert_allclose(s.loc[s["unit"] == i, "x_norm"], t.norm(dim=1).numpy(), rtol=1e-5)
        np.testing.assert_allclose(s.loc[s["unit"] == i, "x_mean"], t.mean(dim=1).numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(s.loc[s["unit"] == i, "grad_norm"], grads[i].norm(dim=1).numpy(), rtol=1e-5)
    if split:   # the shortcut is a copy of x_l: the direct term of the last unit is dE/dx_L itself
        last = s[s["unit"] == len(seen) - 1]
        np.testing.assert_allclose(last["direct_ratio"], 1.0, rtol=1e-6)


class _TwoAddOverwrite(nn.Module):
    """Two residual additions found by fx; the second unit's branch overwrites its input in place."""

    def __init__(self, d):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        y = x + self.a(torch.tanh(x))
        return y * 1.0 + self.b(y.relu_())


def test_second_fx_unit_that_overwrites_its_input_is_measured_at_the_input_it_was_given():
    torch.manual_seed(0)
    m = ResMLP(n=1, block=_TwoAddOverwrite)
    x, y = data(n=5, shape=(8,))
    # plain autograd: x_1 (the first addition's output) and dE/dx_1, taken before the in-place ReLU
    blk = m.blocks[0]
    x0 = m.inp(x)
    x1 = x0 + blk.a(torch.tanh(x0))
    seen = x1.detach().clone()
    g = {}
    x1.register_hook(lambda t: g.__setitem__("x1", t))
    out = m.head(x1 * 1.0 + blk.b(x1.relu_()))
    F.cross_entropy(out, y).backward()
    with gradflow.trace(m, units="fx") as tr:
        F.cross_entropy(m(x), y).backward()
    assert [i.found for i in tr.infos] == ["fx", "fx"]
    s = tr.samples.sort_values(["unit", "sample"])
    np.testing.assert_allclose(s.loc[s["unit"] == 1, "x_norm"], seen.norm(dim=1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(s.loc[s["unit"] == 1, "grad_norm"], g["x1"].norm(dim=1).numpy(), rtol=1e-5)
