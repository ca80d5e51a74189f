"""Units called with extra positional and keyword arguments: passed to branches that take them,
refused by name where the declared branch does not."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import gradflow
from gradflow.tracing.parts import Parts
from tracing_helpers import grads_at_inputs, per_sample_norm

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


class MaskedBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self, x, mask=None):
        r = self.branch(x)
        return x + (r if mask is None else r * mask)


class Net(nn.Module):
    def __init__(self, d=6, n=3, positional=False):
        super().__init__()
        self.positional = positional
        self.blocks = nn.ModuleList([MaskedBlock(d) for _ in range(n)])

    def forward(self, x, mask=None):
        for b in self.blocks:
            x = b(x, mask) if self.positional else b(x, mask=mask)
        return x


def test_keyword_extras_a_declared_branch_does_not_take_are_refused_by_name():
    torch.manual_seed(0)
    net = Net()
    with pytest.raises(gradflow.GradflowError, match=r"unit 'blocks.0' .*keyword argument 'mask'.*lambda z, mask=None"):
        with gradflow.trace(net, units=list(net.blocks), parts={"branch": "branch"}):
            net(torch.randn(4, 6)).sum().backward()
    # the model is left as it was
    assert all("forward" not in vars(b) for b in net.blocks)


def test_positional_extras_are_refused_by_position():
    torch.manual_seed(0)
    net = Net(positional=True)
    with pytest.raises(gradflow.GradflowError, match=r"unit 'blocks.0' .*positional argument 2"):
        with gradflow.trace(net, units=list(net.blocks), parts={"branch": "branch"}):
            net(torch.randn(4, 6), torch.ones(6)).sum().backward()


@pytest.mark.parametrize("positional", [False, True])
def test_extras_reach_branches_that_take_them(positional):
    torch.manual_seed(0)
    net = Net(positional=positional)
    x, mask = torch.randn(5, 6, requires_grad=True), torch.rand(6)

    def parts(m):
        return Parts(branch=lambda z, mask=None: m.branch(z) * mask)
    w = torch.randn(5, 6)
    ts, gs = grads_at_inputs(list(net.blocks), lambda: (net(x, mask) * w).sum())
    with gradflow.trace(net, units=list(net.blocks), parts=parts) as tr:
        (net(x, mask) * w).sum().backward()
    s = tr.samples.sort_values(["unit", "sample"])
    for i, g in enumerate(gs):
        np.testing.assert_allclose(s.loc[s["unit"] == i, "grad_norm"], per_sample_norm(g).numpy(), rtol=1e-5)
    # identity shortcuts, no post: the direct term is dE/dx_L at every unit
    d = s[s["unit"] < len(gs) - 1]
    np.testing.assert_allclose(d["direct_norm"].to_numpy(),
                               np.tile(per_sample_norm(gs[-1]).numpy(), len(gs) - 1), rtol=1e-5)
