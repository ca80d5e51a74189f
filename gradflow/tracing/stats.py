"""Per-sample statistics, computed on the device without copies.

All reductions run over every dimension but the batch one, in float32 (float64
tensors in float64, so a float64 model's rows keep its precision), and work on
channels_last, bf16 and fp16 tensors as they are. Shapes: ``[B, ...] -> [B]``.
"""
from __future__ import annotations

import torch
from torch import Tensor


_DIMS = [tuple(range(1, n)) for n in range(16)]


def _dims(t: Tensor) -> tuple[int, ...]:
    n = t.ndim
    return _DIMS[n] if n < 16 else tuple(range(1, n))


def acc(t: Tensor) -> torch.dtype:
    """The dtype a reduction of ``t`` runs in: float64 stays float64, everything else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def norm(t: Tensor) -> Tensor:
    """Per-sample L2 norm."""
    return torch.linalg.vector_norm(t.detach(), dim=_dims(t), dtype=acc(t))


def mean(t: Tensor) -> Tensor:
    """Per-sample mean of the elements."""
    return t.detach().mean(dim=_dims(t), dtype=acc(t))


def dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product."""
    a, b = a.detach(), b.detach()
    if a.is_contiguous() and b.is_contiguous() and a.dtype == b.dtype and a.dtype in _EXACT:
        return torch.linalg.vecdot(a.flatten(1), b.flatten(1))
    return (a * b).sum(dim=_dims(a), dtype=torch.promote_types(acc(a), acc(b)))


def dot_into(buf: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product of ``buf`` and ``b``, computed in ``buf`` (overwritten).

    No temporary of the tensors' size: on the CPU a fresh one costs page faults.
    """
    return buf.detach().mul_(b.detach()).sum(dim=_dims(buf), dtype=acc(buf))


_EXACT = (torch.float32, torch.float64)
