"""A stack of path-length components at one tensor, and its memory-layout helpers.

See :mod:`gradflow.tracing.paths.carrier`. On the fast route a stack's entries are kept
channels_last (``[M, B, C, H, W]``, each entry in NHWC order) and reductions
read it in memory order, without copies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class PathStack:
    """Components of dE/dx at one tensor: ``v[i] * exp(log_scale[i])``, i = 0 .. M-1.

    Entry i holds the paths through exactly i branches, except the last entry
    when ``remainder`` is True, which holds every path through more than
    ``max_len`` branches.
    """

    v: Tensor               # [M, *x.shape], each entry scaled to max |v| <= ~1 (to norm <= ~1 on the fast route)
    log_scale: Tensor       # [M] float64, on v's device
    remainder: bool = False
    raw: Optional[Tensor] = None    # [M, B] per-sample norms of v itself (cached; float32 or float64)
    buf: Optional[Tensor] = None    # the fast route's buffer v is the head of (reused by the next unit)
    g_ref: Optional[Tensor] = None  # the gradient the next two were taken against (see through_unit's g)
    raw_dots: Optional[Tensor] = None   # [M, B] <v_k, g_ref> per sample (v itself, not scaled)
    total: Optional[Tensor] = None      # sum_k exp(log_scale_k) v_k, flattened in memory order

    def raw_norms(self) -> Tensor:
        """[M, B]: the per-sample norms of ``v`` (not scaled), computed once."""
        if self.raw is None:
            self.raw = torch.linalg.vector_norm(memory_flat(self.v.detach(), 2), dim=2, dtype=accumulation_dtype(self.v))
        return self.raw

    def log_magnitude(self) -> Tensor:
        """[M] float64: log of each entry's norm (over the batch); its log scale where v is 0 or not finite."""
        n = torch.linalg.vector_norm(self.raw_norms().double(), dim=1)
        ok = (n > 0) & torch.isfinite(n)
        return self.log_scale + torch.log(torch.where(ok, n, torch.ones_like(n)))

    def closure_error(self, g: Tensor) -> Tensor:
        """[B]: ||sum_k g^(k) - g|| / ||g|| per sample (in v's dtype), for g = dE/dx from autograd."""
        v = self.v.detach()
        gf = memory_flat(g.detach().contiguous(memory_format=torch.channels_last), 1) if is_channels_last(v) else \
            g.detach().flatten(1)
        gf = gf.to(v.dtype)
        if self.total is not None and self.g_ref is g:
            total = self.total.view_as(gf)
        else:
            total = torch.mv(memory_flat(v, 1).t(), torch.exp(self.log_scale).to(v.dtype)).view_as(gf)
        return torch.linalg.vector_norm(total - gf, dim=1) / \
            torch.linalg.vector_norm(gf, dim=1).clamp_min(torch.finfo(v.dtype).tiny)

    @property
    def ks(self) -> list[int]:
        """The path length of each entry; -1 for the remainder."""
        m = self.v.shape[0]
        return list(range(m - 1)) + [-1] if self.remainder else list(range(m))

    def values(self, dtype=torch.float64) -> Tensor:
        """The components themselves, [M, *x.shape] (float64 by default: deep ones underflow float32)."""
        s = torch.exp(self.log_scale).to(dtype).view(-1, *([1] * (self.v.ndim - 1)))
        return self.v.to(dtype) * s

    def per_sample_norms(self) -> Tensor:
        """[M, B] float64: ||g^(k)|| of each sample, without underflow."""
        return self.raw_norms().double() * torch.exp(self.log_scale).view(-1, 1)

    def per_sample_dots(self, g: Tensor) -> Tensor:
        """[M, B] float64: <g^(k), g> per sample, for a tensor g shaped like x."""
        dt = accumulation_dtype(self.v)
        v = self.v.detach()
        if self.raw_dots is not None and self.g_ref is g:
            return self.raw_dots.double() * torch.exp(self.log_scale).view(-1, 1)
        gf = memory_flat(g.detach().contiguous(memory_format=torch.channels_last), 1) if is_channels_last(v) else \
            g.detach().flatten(1)      # g's elements in the order of v's
        vf, gf = memory_flat(v, 2).to(dt), gf.to(dt)
        d = torch.stack([torch.mv(vf[:, b], gf[b]) for b in range(vf.shape[1])], dim=1)   # no copy of v
        return d.double() * torch.exp(self.log_scale).view(-1, 1)


def is_channels_last(v: Tensor) -> bool:
    """Whether a stack [M, B, C, H, W] holds each entry in channels_last order (see paths_vjp)."""
    if v.ndim != 5:
        return False
    st = v.stride()
    return st[2] == 1 and st[4] == v.shape[2] and st[3] == v.shape[2] * v.shape[4] and v.shape[2] > 1


def memory_flat(v: Tensor, keep: int) -> Tensor:
    """v with its dims from ``keep`` on flattened in memory order: [M, B, N] (keep=2) or [M, N]
    (keep=1) of a stack; a view, not a copy, also for channels_last stacks."""
    if is_channels_last(v):
        return v.permute(0, 1, 3, 4, 2).reshape(v.shape[0], -1) if keep == 1 else \
            v.permute(0, 1, 3, 4, 2).reshape(v.shape[0], v.shape[1], -1)
    if v.ndim == 4 and keep == 1 and v.is_contiguous(memory_format=torch.channels_last):
        return v.permute(0, 2, 3, 1).reshape(v.shape[0], -1)     # [B, C, H, W] in channels_last order
    return v.flatten(keep)


def new_stack(n: int, entry: tuple, like: Tensor, channels_last: bool) -> Tensor:
    """An uninitialised stack [n, *entry], each entry channels_last when asked (4-d entries only)."""
    if channels_last and len(entry) == 4:
        return torch.empty((n * entry[0],) + tuple(entry[1:]), dtype=like.dtype, device=like.device,
                           memory_format=torch.channels_last).view(n, *entry)
    return like.new_empty((n,) + tuple(entry))


def accumulation_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; everything else is reduced in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rescaled(v: Tensor, ls: Tensor) -> tuple[Tensor, Tensor]:
    """Each entry divided (in place: v is a fresh product) by its max |v|; all-zero or non-finite entries kept."""
    lo, hi = torch.aminmax(memory_flat(v.detach(), 1), dim=1)     # max |v| in one pass, no copy
    m = torch.maximum(hi, -lo).float()
    m = torch.where((m > 0) & torch.isfinite(m), m, torch.ones_like(m))
    return v.div_(m.to(v.dtype).view(-1, *([1] * (v.ndim - 1)))), ls + torch.log(m.double())


def shift_scaled(g: Tensor, f: Tensor, up: bool) -> Tensor:
    """[M+1, ...]: entries of g [M, ...] times f[:M] or f[1:], shifted up by one (a zero entry 0) or not."""
    out = g.new_empty((g.shape[0] + 1,) + g.shape[1:])
    body, free = (out[1:], out[0]) if up else (out[:-1], out[-1])
    torch.mul(g, broadcast_to(f[1:] if up else f[:-1], g), out=body)
    free.zero_()
    return out


def broadcast_to(f: Tensor, like: Tensor) -> Tensor:
    return f.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))
