"""An autograd oracle for the residual additions of any network, independent of gradflow.

:class:`AddTap` sees every addition of two floating tensors of one shape as the
network runs (the additions gradflow counts), keeps both operands with
``retain_grad``, asks autograd itself whether one operand is computed from the
other (``autograd.grad`` of one with respect to the other, at the moment of the
addition), and, for the additions it is told, detaches one operand: the
detached-branch network, whose forward is the same and whose gradient at each
unit's input is the direct term alone. Forward pre-hooks keep the inputs of
chosen module calls (a projection unit's x_l).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.overrides import TorchFunctionMode

_ADDS = (torch.Tensor.add, torch.add, torch.Tensor.add_)


def _two_tensors(func, args, kwargs) -> bool:
    return (func in _ADDS and len(args) >= 2 and isinstance(args[0], Tensor)
            and isinstance(args[1], Tensor) and args[0].shape == args[1].shape
            and args[0].is_floating_point() and args[1].is_floating_point()
            and kwargs.get("alpha", 1) == 1 and "out" not in kwargs)


def depends(b: Tensor, a: Tensor) -> bool:
    """Whether autograd finds ``b`` computed from ``a``."""
    if not (a.requires_grad and b.requires_grad) or a is b:
        return False
    (g,) = torch.autograd.grad(b, a, torch.ones_like(b), retain_graph=True, allow_unused=True)
    return g is not None


class AddTap(TorchFunctionMode):
    """``adds[k] = (a, b, inplace)`` and ``dependent[k]`` for the k-th addition; ``detach``:
    add index -> operand position to detach; ``check``: ask autograd about dependence."""

    def __init__(self, detach: Optional[dict] = None, check: bool = False):
        super().__init__()
        self.adds: list = []
        self.dependent: list = []
        self.detach = detach or {}
        self.check = check

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _two_tensors(func, args, kwargs):
            return func(*args, **kwargs)
        k = len(self.adds)
        a, b = args[0], args[1]
        inplace = func is torch.Tensor.add_
        if self.check:
            self.dependent.append(depends(b, a) or depends(a, b))
        for i, t in enumerate((a, b)):
            if t.requires_grad and not (inplace and i == 0):
                t.retain_grad()
        self.adds.append((a, b, inplace))
        if k in self.detach:
            args = list(args)
            args[self.detach[k]] = args[self.detach[k]].detach()
        return func(*args, **kwargs)


def run(model: nn.Module, call: Callable[[nn.Module], Tensor], weight: Callable[[Tensor], Tensor], detach: Optional[dict] = None,
        inputs_of: tuple = (), check: bool = False):
    """One forward and backward of ``model`` under :class:`AddTap`; the loss is ``(out * weight(out)).sum()``.

    ``inputs_of``: modules whose calls' first inputs to keep (with their gradient).
    Returns (tap, output, {(id(module), call number): input tensor}).
    """
    captured, counts, handles = {}, {}, []
    for m in inputs_of:
        def hook(mod, args):
            c = counts.get(id(mod), 0)
            counts[id(mod)] = c + 1
            x = args[0]
            if isinstance(x, Tensor) and x.requires_grad:
                x.retain_grad()
            captured[(id(mod), c)] = x
        handles.append(m.register_forward_pre_hook(hook))
    tap = AddTap(detach, check)
    try:
        with tap:
            out = call(model)
    finally:
        for h in handles:
            h.remove()
    (out * weight(out)).sum().backward()
    return tap, out, captured
