"""The parts of a residual unit and the one function that runs them.

A residual unit (PAPER.md section 1) is

    z     = preact(x)                    shared pre-activation (often absent)
    h     = shortcut(z or x)             the shortcut h; None means identity
    r     = branch(z)                    the residual branch F
    y, c  = combine(h, r, x)             sum, scaled sum or gates; c is h's coefficient
    x_out = post(y)                      the after-addition activation f; None means identity

Every unit gradflow knows, from its own zoo, torchvision, timm or declared by a
user, is described by a :class:`Parts`, and :func:`run_parts` is the single place
that evaluates one. The zoo's units run through it in ``forward``; the tracer
runs third-party units through it too, so the tensors h, F and y exist as
separate nodes of the autograd graph and the direct (shortcut-path) term of
dE/dx_l can be taken exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
from torch import Tensor

Fn = Callable[[Tensor], Tensor]


def combine_sum(h: Tensor, r: Tensor, x: Tensor) -> tuple[Tensor, float]:
    """y = h + F, the original and pre-activation units."""
    return h + r, 1.0


@dataclass
class Parts:
    """A residual unit split into the parts the paper names.

    ``shortcut=None`` is the identity; ``shortcut_preact`` says whether the
    shortcut reads the pre-activated tensor (the official pre-activation code's
    projection units) or the raw input. ``combine`` returns ``(y, c)`` where
    ``c`` is the coefficient h is multiplied by (1, lambda, or 1 - g(x)).
    """

    branch: Fn
    shortcut: Optional[Fn] = None
    combine: Callable[[Tensor, Tensor, Tensor], tuple] = combine_sum
    post: Optional[Fn] = None
    preact: Optional[Fn] = None
    shortcut_preact: bool = False


class Tap(Protocol):
    def __call__(self, *, x: Tensor, z: Tensor, s_in: Tensor, h: Tensor, r: Tensor,
                 y: Tensor, coef, out: Tensor) -> None: ...


def run_parts(parts: Parts, x: Tensor, tap: Optional[Tap] = None) -> Tensor:
    """Evaluate a unit from its parts. ``tap`` (the tracer) sees every intermediate.

    With a tap, an identity shortcut becomes a view of its input so that h is a
    node of its own in the autograd graph (needed to separate the shortcut path
    from the residual path); without one, nothing extra is computed.
    """
    z = parts.preact(x) if parts.preact is not None else x
    s_in = z if parts.shortcut_preact else x
    if parts.shortcut is not None:
        h = parts.shortcut(s_in)
    else:
        h = s_in.view_as(s_in) if tap is not None else s_in
    r = parts.branch(z)
    y, coef = parts.combine(h, r, x)
    out = parts.post(y) if parts.post is not None else y
    if tap is not None:
        if out is y and parts.post is not None:
            raise RuntimeError(
                "the unit's after-addition activation ran in place on h + F; declare "
                "an out-of-place post (for example torch.relu) so gradflow can trace it")
        tap(x=x, z=z, s_in=s_in, h=h, r=r, y=y, coef=coef, out=out)
    return out


def as_fn(module) -> Optional[Fn]:
    """``None`` for absent or identity modules, else the module (a callable)."""
    if module is None or isinstance(module, torch.nn.Identity):
        return None
    return module
