"""Units found by torch.fx (a hand-written x + f(x) network) run everywhere units run: the path
split, Veit's sampled paths and the lesion study, each against plain autograd or a network
rebuilt by hand."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gradflow
from gradflow.experiments.lesion import error_rate, lesion_study, removed, residual_blocks
from gradflow.tracing.parts import PLAIN, Runner
from gradflow.tracing.paths import path_components, sample_paths
from tracing_helpers import ResMLP, grads_at_inputs

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def mlp(seed=0, n=4):
    torch.manual_seed(seed)
    return ResMLP(d=6, n=n, classes=3).double()


def data(seed=1, n=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_units_are_found_by_fx():
    infos = gradflow.find_units(mlp())
    assert [i.found for i in infos] == ["fx"] * 4


def test_path_components_of_fx_units_sum_to_autograd():
    m = mlp()
    x, y = data()
    blocks = list(m.blocks)
    _, grads = grads_at_inputs(blocks, lambda: F.cross_entropy(m(x), y))
    res = path_components(m, x, y=y, keep=True)
    n = len(blocks)
    for i, g in enumerate(grads[:-1]):
        comp = res.components[i]
        assert comp.shape == (n - i + 1, *g.shape)
        torch.testing.assert_close(comp.sum(0), g, rtol=1e-10, atol=1e-14)
        # identity shortcuts, nothing between units: the length-0 path is dE/dx_L itself
        torch.testing.assert_close(comp[0], grads[-1], rtol=1e-12, atol=1e-15)
    assert res.units["sum_rel_err"].max() < 1e-10


def _branch_only_path(m, x, g_top):
    """The one path through every branch: dE/dx_L pulled back through each f_l alone."""
    xs, h = [], m.inp(x)
    for b in m.blocks:
        xs.append(h.detach().requires_grad_())
        h = h + b.fc2(torch.relu(b.fc1(h)))
    v = g_top
    for b, xl in zip(reversed(list(m.blocks)), reversed(xs)):
        (v,) = torch.autograd.grad(b.fc2(torch.relu(b.fc1(xl))), xl, v)
    return v


def test_sample_paths_of_fx_units_match_hand_computed_paths():
    m = mlp()
    x, y = data()
    blocks = list(m.blocks)
    n = len(blocks)
    _, grads = grads_at_inputs(blocks, lambda: F.cross_entropy(m(x), y))
    est = sample_paths(m, x, y=y, ks=[0, n], samples=2).set_index("k")
    assert est.loc[0, "path_norm"] == pytest.approx(grads[-1].norm(dim=1).mean().item(), rel=1e-10)
    full = _branch_only_path(m, x, grads[-1])
    assert est.loc[n, "path_norm"] == pytest.approx(full.norm(dim=1).mean().item(), rel=1e-10)


def test_lesion_of_fx_units_matches_a_network_without_that_branch():
    m = mlp(n=3)
    x, y = data(n=64)
    blocks = residual_blocks(m)
    assert len(blocks) == 3
    for i in range(3):
        hand = copy.deepcopy(m)
        hand.blocks[i] = torch.nn.Identity()       # x + f(x) without f: x
        with torch.no_grad(), removed(blocks, [i]):
            out = m(x)
        torch.testing.assert_close(out, hand(x), rtol=0, atol=0)
    res = lesion_study(m, [(x, y)], ks=(2,), draws=1, swaps=())
    for i in range(3):
        hand = copy.deepcopy(m)
        hand.blocks[i] = torch.nn.Identity()
        assert res.single.loc[i, "error"] == pytest.approx(error_rate(hand, [(x, y)]))
    assert res.baseline == pytest.approx(error_rate(m, [(x, y)]))


def test_every_runner_derives_from_the_base():
    from gradflow.experiments.lesion import _ShortcutOnly
    from gradflow.tracing.paths.components import _Runner
    from gradflow.tracing.recorder import _Run
    for cls in (_Run, _Runner, _ShortcutOnly, type(PLAIN)):
        assert issubclass(cls, Runner)
        for hook in ("unit", "add", "enter"):
            assert getattr(cls, hook) is getattr(Runner, hook), (cls, hook)


class _SideBlock(torch.nn.Module):
    """A unit whose output the network computes and throws away."""

    def __init__(self, d):
        super().__init__()
        self.fc = torch.nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(x)


def test_a_nan_gradient_row_appears_only_where_no_backward_reached_and_is_named():
    m = mlp(n=3)
    m.side = _SideBlock(6).double()
    inner = m.forward

    def forward(x):
        m.side(m.inp(x))            # a unit whose output the loss does not use
        return inner(x)
    m.forward = forward
    x, y = data()
    units = list(m.blocks) + [m.side]
    _, grads = grads_at_inputs(list(m.blocks), lambda: F.cross_entropy(m(x), y))
    with pytest.warns(RuntimeWarning, match=r"did not reach unit\(s\) 0 \(side\): the loss does not depend"):
        with gradflow.trace(m, units=units) as tr:
            F.cross_entropy(m(x), y).backward()
    df = tr.units.set_index("name")
    assert np.isnan(df.loc["side", "grad_norm"])
    got = df.loc[[f"blocks.{i}" for i in range(3)], "grad_norm"].to_numpy()
    np.testing.assert_allclose(got, [g.norm(dim=1).mean().item() for g in grads[:-1]], rtol=1e-10)
