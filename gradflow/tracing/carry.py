"""The direct term carried back through the recorded graph, during the backward pass.

When dE/dx_{l+1} is complete, unit l's part of the graph has not run yet: a
small re-entrant ``autograd.grad`` through its after-addition activation and
shortcut (and whatever sits between two units), at the recorded forward, gives
direct_l from direct_{l+1}. The vectors are carried with a log scale, since deep
products of lambda underflow float32.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from gradflow.tracing import stats
from gradflow.tracing.records import Call


class DirectCarrier:
    """Mixin of :class:`~gradflow.tracing.Tracer`: the carry and its scratch buffers."""

    _buffers: dict
    _busy: bool

    def _residual(self, g: Tensor, d: Tensor, direct_log_scale) -> Tensor:
        """g - exp(direct_log_scale) d into a buffer reused across units of the same shape.

        A fresh tensor per unit would cost an allocation (and, on the CPU, page
        faults) per unit; the buffers live until the end of the backward pass.
        """
        key = (g.shape, g.dtype, g.device, g.stride())
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty_like(g)
        if isinstance(direct_log_scale, Tensor):
            return torch.addcmul(g, d, torch.exp(direct_log_scale).neg().to(d.dtype), out=buf)
        return torch.sub(g, d, alpha=math.exp(direct_log_scale), out=buf)

    def _carry(self, call: Call, v: Tensor, vr: Tensor, v_norm: Optional[Tensor] = None,
               direct_log_scale=0.0, ref_log_scale=0.0, carries: int = 0) -> None:
        """direct at unit ``call``'s input from direct at its output (and the same for ref).

        The vectors are carried with a log scale, renormalised every few units
        that change them: 0.5**54 of a gradient is below float32's smallest
        square, 0.5**333 below its smallest number.
        """
        if call.out_edge is None or call.h_edge is None:
            return  # a unit without parts: the split stops here
        changed = False
        if call.has_post:
            v, vr = self._grad(call.out_edge, call.y_edge, v, vr)
            changed = True
        c = call.coef
        if not (isinstance(c, float) and c == 1.0):
            v, changed = v * c, True
        if not call.identity_shortcut:
            v, vr = self._grad(call.h_edge, call.x_edge, v, vr)
            changed = True
        if changed:
            carries += 1
            v_norm = None
            if carries >= _RESCALE_EVERY:
                carries = 0
                same = vr is v
                v, direct_log_scale = _rescale(v, direct_log_scale)
                vr, ref_log_scale = (v, direct_log_scale) if same else _rescale(vr, ref_log_scale)
        call.direct, call.ref, call.direct_norm = v, vr, v_norm
        call.direct_log_scale, call.ref_log_scale, call.carries = direct_log_scale, ref_log_scale, carries

    def _grad(self, out_edge, in_edge, v: Tensor, vr: Tensor):
        """Vector-Jacobian products of one piece of the recorded graph with v (and vr)."""
        self._busy = True
        try:
            ws = [v] if vr is v else [v, vr]
            gs = [torch.autograd.grad([out_edge], [in_edge], [w], retain_graph=True)[0] for w in ws]
            return gs[0], gs[-1]
        finally:
            self._busy = False


_RESCALE_EVERY = 4


def _rescale(v: Tensor, ls):
    """v / max|v| and the log scale that undoes it, without a host synchronisation."""
    m = v.detach().abs().amax().to(stats.acc(v)).clamp_min(1e-30)   # float64 keeps its precision
    return v / m.to(v.dtype), ls + torch.log(m)


def _exp(ls):
    return torch.exp(ls) if isinstance(ls, Tensor) else math.exp(ls)


