"""Matrix-free spectra of a unit's Jacobian: power iteration with jvp and vjp.

For the map x_l -> x_{l+1} of one unit (and for its residual branch F alone),
the top singular value of the Jacobian, and ||J - I||_2, the distance of the
unit from the identity map that eq. (5) idealises. The map is the whole batch
map, as the unit computes it in train mode (BN couples samples), evaluated
once at the recorded input: the same BN batch statistics and dropout masks for
every product. Running statistics and the global RNG are left as they were.

Cost: ``iters`` x (one jvp + one vjp) per quantity. Opt-in: the tracer's
``quantities=[Spectra(iters)]`` or the ``"full"`` preset (:class:`gradflow.tracing.quantities.Spectra`).
Tracing owns this code; :mod:`gradflow.tracing.spectra` re-exports it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from gradflow.tracing.parts import Parts, run_parts
from gradflow.utils.state import device_generator, untouched


preserved_state = untouched   # buffers (BN running stats) and the RNG restored afterwards


class _Linearised:
    """J v and J^T u of out = f(x) at a fixed point, from one graph (double-vjp trick)."""

    def __init__(self, out: Tensor, x: Tensor):
        self.out, self.x = out, x
        self.u0 = torch.zeros_like(out, requires_grad=True)
        (self.jt_u0,) = torch.autograd.grad(out, x, self.u0, create_graph=True)

    def jvp(self, v: Tensor) -> Tensor:
        return torch.autograd.grad(self.jt_u0, self.u0, v, retain_graph=True)[0]

    def vjp(self, u: Tensor) -> Tensor:
        return torch.autograd.grad(self.out, self.x, u, retain_graph=True)[0]


def top_singular_value(lin: _Linearised, iters: int, minus_identity: bool = False,
                       generator: Optional[torch.Generator] = None) -> float:
    """sigma_max of J (or of J - I) by power iteration on J^T J."""
    v = torch.randn(lin.x.shape, device=lin.x.device, dtype=lin.x.dtype, generator=generator)
    v = v / v.norm()
    sigma = 0.0
    for _ in range(iters):
        u = lin.jvp(v)
        if minus_identity:
            u = u - v
        w = lin.vjp(u)
        if minus_identity:
            w = w - u
        n = w.norm()
        if n == 0:
            return 0.0
        sigma = float(n.sqrt())
        v = w / n
    return sigma


def unit_spectra(module: nn.Module, parts: Parts, x: Tensor, iters: int = 20, seed: int = 0) -> dict:
    """sigma_unit, sigma_branch and dist_identity (NaN where shapes differ) of one unit at input x."""
    x = x.detach().float()
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    result = {}
    with preserved_state(module, x.device), torch.enable_grad(), \
            torch.autocast(x.device.type, enabled=False):
        xi = x.clone().requires_grad_()
        device_generator(x.device).manual_seed(seed)
        out = run_parts(parts, xi)
        lin = _Linearised(out, xi)
        result["sigma_unit"] = top_singular_value(lin, iters, generator=gen)
        same = out.shape == xi.shape
        result["dist_identity"] = top_singular_value(lin, iters, True, gen) if same else float("nan")
        xb = x.clone().requires_grad_()
        z = parts.preact(xb) if parts.preact is not None else xb
        result["sigma_branch"] = top_singular_value(_Linearised(parts.branch(z), xb), iters, generator=gen)
    return result
