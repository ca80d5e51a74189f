"""Independent computations the tracer is checked against: plain autograd only."""
import torch
import torch.nn.functional as F

from gradflow.models.units import Gate, ScaledSum


def unit_inputs_and_grads(model, units, x, y, seed=0):
    """Run model on x with plain forward pre-hooks; return unit inputs, x_L and their gradients."""
    xs, last = [], []
    hs = [u.register_forward_pre_hook(lambda m, a: xs.append(a[0])) for u in units]
    hs.append(units[-1].register_forward_hook(lambda m, a, o: last.append(o)))
    try:
        torch.manual_seed(seed)
        loss = F.cross_entropy(model(x), y)
    finally:
        for h in hs:
            h.remove()
    grads = torch.autograd.grad(loss, xs + last)
    return xs + last, list(grads)


def per_sample_norm(t):
    return t.detach().flatten(1).norm(dim=1)


def zoo_direct(model, x, y, seed=0):
    """Direct terms of a zoo CifarResNet by a forward in which every residual branch
    (and every gate) is detached: the gradient then flows through shortcuts and
    after-addition activations only."""
    torch.manual_seed(seed)
    loss_inputs = []
    # dE/dx_L from a plain run
    _, grads = unit_inputs_and_grads(model, model.units(), x, y, seed)
    g_top = grads[-1]
    torch.manual_seed(seed)
    h = model.stem(x)
    xs = []
    for u in model.units():
        h = h.detach().requires_grad_()
        xs.append(h)
        z = u.preact(h)
        s = u.shortcut(z if u.shortcut_preact else h)
        r = u.branch(z).detach()
        c = u.combine
        if isinstance(c, ScaledSum):
            y_ = c.scale * s + c.branch_scale * r
        elif isinstance(c, Gate):
            g = torch.sigmoid(c.conv(h)).detach()
            y_ = (1 - g) * s + (g * r if c.exclusive else r)
        else:
            y_ = s + r
        out = u.post(y_)
        loss_inputs.append(out)
        h = out
    # chain rule piece by piece: direct_l = J_l^T direct_{l+1}
    directs = [None] * len(xs)
    v = g_top
    for i in reversed(range(len(xs))):
        (v,) = torch.autograd.grad(loss_inputs[i], xs[i], v, retain_graph=True)
        directs[i] = v
    return directs, g_top


def torchvision_direct(model, x, y, blocks):
    """Direct terms for a torchvision ResNet by a re-run with detached branches."""
    _, grads = unit_inputs_and_grads(model, blocks, x, y)
    g_top = grads[-1]
    m = model
    h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    xs, outs = [], []
    for b in blocks:
        h = h.detach().requires_grad_()
        xs.append(h)
        identity = b.downsample(h) if b.downsample is not None else h
        if hasattr(b, "conv3"):
            r = b.bn3(b.conv3(b.relu(b.bn2(b.conv2(b.relu(b.bn1(b.conv1(h))))))))
        else:
            r = b.bn2(b.conv2(b.relu(b.bn1(b.conv1(h)))))
        h = torch.relu(identity + r.detach())
        outs.append(h)
    directs, v = [None] * len(xs), g_top
    for i in reversed(range(len(xs))):
        (v,) = torch.autograd.grad(outs[i], xs[i], v, retain_graph=True)
        directs[i] = v
    return directs, g_top


def detached_chain(blocks, xs, g_top, detached_forward):
    """Direct terms by the chain rule over blocks whose branch output is detached.

    ``xs`` are the blocks' recorded inputs; ``detached_forward(block, x)`` must
    return the block's output with its residual branch detached."""
    directs, v = [None] * len(blocks), g_top
    for i in reversed(range(len(blocks))):
        x = xs[i].detach().requires_grad_()
        torch.manual_seed(0)
        out = detached_forward(blocks[i], x)
        (v,) = torch.autograd.grad(out, x, v)
        directs[i] = v
    return directs


def timm_detached_forward(b, x):
    """timm resnet BasicBlock/Bottleneck and resnetv2 PreAct blocks with F detached."""
    name = type(b).__name__
    if name.startswith("PreAct"):
        z = b.norm1(x)
        s = b.downsample(z) if b.downsample is not None else x
        r = b.conv2(b.norm2(b.conv1(z)))
        if hasattr(b, "conv3"):
            r = b.conv3(b.norm3(r))
        return s + b.drop_path(r).detach()
    s = b.downsample(x) if b.downsample is not None else x
    r = b.aa(b.act1(b.drop_block(b.bn1(b.conv1(x)))))
    if hasattr(b, "conv3"):
        r = b.aa(b.act2(b.drop_block(b.bn2(b.conv2(b.act1(b.bn1(b.conv1(x))))))))
        r = b.bn3(b.conv3(r))
    else:
        r = b.bn2(b.conv2(r))
    return torch.relu(s + r.detach())


# --- hand-written networks for the tracer-in-training tests ---------------------------

import torch.nn as nn  # noqa: E402


class MLPBlock(nn.Module):
    """x + f(x), written by hand: found through torch.fx, split with no declaration."""

    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.detach_branch = False   # the oracle's detached-branch network

    def forward(self, x):
        r = self.fc2(torch.relu(self.fc1(x)))
        return x + (r.detach() if self.detach_branch else r)


class ResMLP(nn.Module):
    def __init__(self, d=8, n=3, classes=3, block=MLPBlock):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList([block(d) for _ in range(n)])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


class TwoAddBlock(nn.Module):
    """A transformer-style block with two residual additions: pre-LN, or post-LN (LN after each sum)."""

    def __init__(self, d, post_ln=False):
        super().__init__()
        self.post_ln = post_ln
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.Linear(d, d)     # a stand-in for attention: any branch works
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.detach_branch = False

    def _d(self, r):
        return r.detach() if self.detach_branch else r

    def forward(self, x):
        if self.post_ln:
            x = self.ln1(x + self._d(self.attn(x)))
            return self.ln2(x + self._d(self.mlp(x)))
        x = x + self._d(self.attn(self.ln1(x)))
        return x + self._d(self.mlp(self.ln2(x)))


def grads_at_inputs(modules, run, top=None):
    """Inputs of ``modules`` (forward pre-hooks) and the output of ``top`` (default: the last
    module), during ``run()``, which returns a loss; returns (inputs + [x_L], their gradients)."""
    xs, last = [], []
    hs = [m.register_forward_pre_hook(lambda m, a: xs.append(a[0])) for m in modules]
    hs.append((top or modules[-1]).register_forward_hook(lambda m, a, o: last.append(o)))
    try:
        loss = run()
    finally:
        for h in hs:
            h.remove()
    ts = xs + last
    return ts, list(torch.autograd.grad(loss, ts))


def detached_direct(model, x, g_top, modules, top=None):
    """Direct terms by autograd through the same network with every branch output detached:
    dE/dx_L carried back through shortcuts (and whatever sits between units) only."""
    for m in model.modules():
        if hasattr(m, "detach_branch"):
            m.detach_branch = True
    try:
        xs, outs = [], []
        hs = [m.register_forward_pre_hook(lambda m, a: xs.append(a[0])) for m in modules]
        hs.append((top or modules[-1]).register_forward_hook(lambda m, a, o: outs.append(o)))
        try:
            model(x)
        finally:
            for h in hs:
                h.remove()
        return list(torch.autograd.grad(outs[-1], xs, g_top, allow_unused=True))
    finally:
        for m in model.modules():
            if hasattr(m, "detach_branch"):
                m.detach_branch = False
