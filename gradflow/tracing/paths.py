"""dE/dx_l split by path length, exactly: the carrier of the components g^(k).

Unrolled, a chain of n residual units is 2^n paths (Veit et al. 2016): at each
unit a path takes the shortcut h or the residual branch F. The gradient at a
unit's input x_l is the sum over the paths from x_l to x_L of each path's
vector-Jacobian product with dE/dx_L; grouping the paths by the number k of
branches they pass gives

    dE/dx_l = sum_k g_l^(k)           g^(0): the direct term of eq. (5)/(8)

and, through one unit y = combine(h(x), F(x), x), x_out = post(y),

    g_in^(k) = S(g_out^(k)) + B(g_out^(k-1))

where S is the vector-Jacobian product through post, the combine's h side (with
its coefficient: 1, lambda or 1 - g(x)) and the shortcut, and B the same through
the combine's other inputs: the branch F (with its coefficient) and, for gates,
g(x)'s own dependence on x (a path through the gate's 1x1 conv passes a weight
layer, so it counts as a branch). S + B is the unit's whole Jacobian, so the
components always sum to dE/dx_l.

:class:`PathCarrier` applies this to a stack ``[K+1, *x.shape]`` of components
through the recorded graph (the same BN batch statistics and dropout masks as
the forward; nothing is recomputed). Fast route: each node of the unit's graph
applied to all components at once from its saved tensors
(:mod:`gradflow.tracing.paths_vjp`), a few entries at a time, in place; where a
unit has a node without a rule there, the autograd route: one
``torch.autograd.grad`` per component (vmap'ed on CUDA). ``PathCarrier.route``
says which each unit took. With ``max_len=K`` the paths through more than K branches are
kept summed in one more entry, the remainder (``k = -1`` in tables), which
passes through the whole unit: R_in = S(R) + B(R + g^(K)).

Each entry carries its own log scale (``v * exp(log_scale)``): a path through
54 branches of gain 0.5 is 5.6e-17 of dE/dx_L, and its square is below
float32's smallest normal number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import GradflowError
from .paths_vjp import compile_vjp


@dataclass
class UnitGraph:
    """The gradient edges of one recorded unit call (``torch.autograd.graph.get_gradient_edge``).

    ``h`` is the shortcut's output (a view of x for an identity shortcut), ``r``
    the branch's, ``xc`` the alias of x the combine read (None if it reads no
    x: a plain or scaled sum), ``out`` the unit's output. ``plain_sum`` says
    y = h + F with no after-addition function: then the combine needs no
    vector-Jacobian product of its own.
    """

    x: Any
    h: Any
    r: Any
    out: Any
    xc: Any = None
    plain_sum: bool = False
    name: str = ""
    y: Any = None           # y = combine(h, F, x) when an after-addition function follows it
    gate: Any = None        # combine(h.detach(), F.detach(), x): the gate's own path to x (see PathTracker)
    fast: Any = None        # the compiled batched products (see PathCarrier._fast), once tried
    x_shape: Optional[tuple] = None   # x's shape, for the fast route


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
            self.raw = torch.linalg.vector_norm(_mem_flat(self.v.detach(), 2), dim=2, dtype=_acc(self.v))
        return self.raw

    def log_magnitude(self) -> Tensor:
        """[M] float64: log of each entry's norm (over the batch); its log scale where v is 0 or not finite."""
        n = torch.linalg.vector_norm(self.raw_norms().double(), dim=1)
        ok = (n > 0) & torch.isfinite(n)
        return self.log_scale + torch.log(torch.where(ok, n, torch.ones_like(n)))

    def closure_error(self, g: Tensor) -> Tensor:
        """[B]: ||sum_k g^(k) - g|| / ||g|| per sample (in v's dtype), for g = dE/dx from autograd."""
        v = self.v.detach()
        gf = _mem_flat(g.detach().contiguous(memory_format=torch.channels_last), 1) if _cl(v) else \
            g.detach().flatten(1)
        gf = gf.to(v.dtype)
        if self.total is not None and self.g_ref is g:
            total = self.total.view_as(gf)
        else:
            total = torch.mv(_mem_flat(v, 1).t(), torch.exp(self.log_scale).to(v.dtype)).view_as(gf)
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
        dt = _acc(self.v)
        v = self.v.detach()
        if self.raw_dots is not None and self.g_ref is g:
            return self.raw_dots.double() * torch.exp(self.log_scale).view(-1, 1)
        gf = _mem_flat(g.detach().contiguous(memory_format=torch.channels_last), 1) if _cl(v) else \
            g.detach().flatten(1)      # g's elements in the order of v's
        vf, gf = _mem_flat(v, 2).to(dt), gf.to(dt)
        d = torch.stack([torch.mv(vf[:, b], gf[b]) for b in range(vf.shape[1])], dim=1)   # no copy of v
        return d.double() * torch.exp(self.log_scale).view(-1, 1)


def _cl(v: Tensor) -> bool:
    """Whether a stack [M, B, C, H, W] holds each entry in channels_last order (see paths_vjp)."""
    if v.ndim != 5:
        return False
    st = v.stride()
    return st[2] == 1 and st[4] == v.shape[2] and st[3] == v.shape[2] * v.shape[4] and v.shape[2] > 1


def _mem_flat(v: Tensor, keep: int) -> Tensor:
    """v with its dims from ``keep`` on flattened in memory order: [M, B, N] (keep=2) or [M, N]
    (keep=1) of a stack; a view, not a copy, also for channels_last stacks."""
    if _cl(v):
        return v.permute(0, 1, 3, 4, 2).reshape(v.shape[0], -1) if keep == 1 else \
            v.permute(0, 1, 3, 4, 2).reshape(v.shape[0], v.shape[1], -1)
    if v.ndim == 4 and keep == 1 and v.is_contiguous(memory_format=torch.channels_last):
        return v.permute(0, 2, 3, 1).reshape(v.shape[0], -1)     # [B, C, H, W] in channels_last order
    return v.flatten(keep)


def _new_stack(n: int, entry: tuple, like: Tensor, channels_last: bool) -> Tensor:
    """An uninitialised stack [n, *entry], each entry channels_last when asked (4-d entries only)."""
    if channels_last and len(entry) == 4:
        return torch.empty((n * entry[0],) + tuple(entry[1:]), dtype=like.dtype, device=like.device,
                           memory_format=torch.channels_last).view(n, *entry)
    return like.new_empty((n,) + tuple(entry))


_KEEP_SCALE = 8.0    # natural log: an entry keeps its log scale while its norm stays within e^+-8 of 1


def _aliases(t: Tensor, buf: Tensor) -> bool:
    return t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()


def _same_view(a: Tensor, b: Tensor) -> bool:
    """The same elements in the same places (an elementwise op from a into b is then safe in place)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _acc(t: Tensor) -> torch.dtype:
    """float64 stays float64; everything else is reduced in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rescale(v: Tensor, ls: Tensor) -> tuple[Tensor, Tensor]:
    """Each entry divided (in place: v is a fresh product) by its max |v|; all-zero or non-finite entries kept."""
    lo, hi = torch.aminmax(_mem_flat(v.detach(), 1), dim=1)     # max |v| in one pass, no copy
    m = torch.maximum(hi, -lo).float()
    m = torch.where((m > 0) & torch.isfinite(m), m, torch.ones_like(m))
    return v.div_(m.to(v.dtype).view(-1, *([1] * (v.ndim - 1)))), ls + torch.log(m.double())


def _shift_scaled(g: Tensor, f: Tensor, up: bool) -> Tensor:
    """[M+1, ...]: entries of g [M, ...] times f[:M] or f[1:], shifted up by one (a zero entry 0) or not."""
    out = g.new_empty((g.shape[0] + 1,) + g.shape[1:])
    body, free = (out[1:], out[0]) if up else (out[:-1], out[-1])
    torch.mul(g, _bcast(f[1:] if up else f[:-1], g), out=body)
    free.zero_()
    return out


def _bcast(f: Tensor, like: Tensor) -> Tensor:
    return f.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


class PathCarrier:
    """Carries a :class:`PathStack` from a unit's output to its input.

    Args:
        max_len: the longest path length kept as its own entry; longer paths
            are summed into one remainder entry. None keeps every length.
        batched: where autograd takes the products: one vmap'ed ``autograd.grad`` per
            product (True) or one call per entry (False); None: batched on CUDA, a loop
            elsewhere (see :func:`_vjp`).
        fast: True (default): every component through a unit in one product per node of
            its graph, from the forward's saved tensors (:mod:`gradflow.tracing.paths_vjp`),
            where every node of the unit has a rule there; autograd elsewhere. False:
            autograd everywhere. ``route`` says, per unit name, which was taken and why.
    """

    chunk_elems = 2 ** 20   # elements per chunk of entries on the fast route (a few MiB: kept in cache)

    def __init__(self, max_len: Optional[int] = None, batched: Optional[bool] = None, fast: bool = True):
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0):
            raise GradflowError(f"max_len={max_len!r} must be None (every length) or an int >= 0")
        self.max_len = max_len
        self.batched = batched
        self.fast = fast
        self.route: dict = {}     # unit name -> "fast" or "autograd: <why>"

    def _vjp(self, outputs: list, inputs: list, grads: list, allow_unused: bool = False):
        batched = self.batched if self.batched is not None else grads[0].is_cuda
        return _vjp(outputs, inputs, grads, allow_unused, batched)

    def start(self, g_top: Tensor) -> PathStack:
        """The stack at x_L: dE/dx_L is the one path through no branch."""
        ls = torch.zeros(1, dtype=torch.float64, device=g_top.device)
        v, ls = _rescale(g_top.detach().unsqueeze(0).clone(), ls)   # never scale the real gradient
        if self.max_len == 0:  # the remainder exists from the start (empty)
            v = torch.cat([v, torch.zeros_like(v)])
            ls = torch.cat([ls, torch.zeros_like(ls)])
            return PathStack(v, ls, remainder=True)
        return PathStack(v, ls)

    # -- one unit --------------------------------------------------------------------

    def split(self, unit: UnitGraph, v: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """dE/dh, dE/dF and the gate's dE/dx for every entry of ``v`` (dE/dx_out): post and combine."""
        if unit.plain_sum:
            return v, v, None
        if unit.gate is not None:
            w = v if unit.y is None else self._vjp([unit.out], [unit.y], [v])[0]
            y = unit.out if unit.y is None else unit.y
            gh, gr = self._vjp([y], [unit.h, unit.r], [w], allow_unused=True)
            (gx,) = self._vjp([unit.gate], [unit.x], [w], allow_unused=True)
            z = torch.zeros_like(w)
            return (gh if gh is not None else z), (gr if gr is not None else z), gx
        ins = [unit.h, unit.r] + ([unit.xc] if unit.xc is not None else [])
        gs = self._vjp([unit.out], ins, [v], allow_unused=True)
        gh, gr = (g if g is not None else torch.zeros_like(v) for g in gs[:2])
        gx = gs[2] if len(gs) > 2 else None
        return gh, gr, gx

    def _fast(self, unit: UnitGraph, v: Tensor) -> Optional[tuple]:
        """(split, shortcut, branch, channels_last) for this unit call, or None (the reason in ``route``)."""
        if unit.fast is None:
            unit.fast = self._compile(unit, v.device.type)
            self.route[unit.name] = "fast" if isinstance(unit.fast, tuple) else f"autograd: {unit.fast}"
        return unit.fast if isinstance(unit.fast, tuple) else None

    def _compile(self, unit: UnitGraph, device_type: str):
        if not self.fast:
            return "fast=False"
        if unit.gate is not None:
            return "a gate's own path to x (g(x) in the combine)"
        if unit.x_shape is None:
            return "x's shape was not recorded"
        cl = len(unit.x_shape) == 4 and unit.x_shape[1] > 1 and device_type == "cpu"
        split = None
        if not unit.plain_sum:
            ins = [unit.h, unit.r] + ([unit.xc] if unit.xc is not None else [])
            split = compile_vjp([unit.out], ins, cl)
            if isinstance(split, str):
                return split
            if len(ins) > 2 and split.reached[2]:
                return "the combine reads x itself"
        progs = [compile_vjp([e], [unit.x], cl) for e in (unit.h, unit.r)]
        for p in progs:
            if isinstance(p, str):
                return p
        if not (progs[0].reached[0] or progs[1].reached[0]):
            return "neither h nor F depends on x"
        return (split,) + tuple(progs) + (cl,)

    def _through_unit_fast(self, progs: tuple, stack: PathStack, x_shape: tuple,
                           g_ref: Optional[Tensor] = None) -> PathStack:
        """:meth:`through_unit` with the compiled products, a few entries at a time (cache-sized).

        Output entry j = fh[j] S(g_h[j]) + fb[j-1] B(g_F[j-1]) (with a remainder, the last
        branch input is fk g_F^(K) + fr g_F^(R): one product for both), all scaled to the new
        entry's log scale (from the entries' norms, known from the unit above). Chunks run
        from the top entry down, so where x has the output's shape the result overwrites the
        input stack's own buffer (every entry a chunk reads lies at or below it, and is read
        before it is written): no new memory per unit. Each finished chunk's per-sample norms
        are taken while it is in cache.
        """
        split, p_h, p_r, cl = progs
        v, ls = stack.v, stack.log_scale
        m = v.shape[0]
        mag = stack.log_magnitude()
        neg = torch.full((1,), -float("inf"), dtype=ls.dtype, device=ls.device)
        if not stack.remainder:
            new = torch.maximum(torch.cat([mag, neg]), torch.cat([neg, mag]))
            mb = m
            remainder = self.max_len is not None and m == self.max_len + 1
        else:
            mag_k, mag_r = mag[:m - 1], mag[m - 1:]
            new = torch.maximum(mag, torch.cat([neg, mag_k[:-1], torch.maximum(mag_k[-1:], mag_r)]))
            mb = m - 1
            remainder = True
        # where an entry's own scale still fits (the result within e^+-8 of norm 1), keep it:
        # the shortcut side then needs no multiply (in place: no pass at all)
        keep_ls = (new[:m] - ls).abs() <= _KEEP_SCALE
        new[:m] = torch.where(keep_ls, ls, new[:m])
        fb = torch.exp(ls[:mb] - new[1:mb + 1])         # with a remainder, the last one is fk, for g^(K)
        fr = torch.exp(ls[m - 1:] - new[-1:]) if stack.remainder else None
        fh = torch.exp(ls - new[:m])
        unit_fh = (fh == 1).tolist()
        n_out = new.shape[0]
        buf = stack.buf
        in_place = (buf is not None and tuple(v.shape[1:]) == tuple(x_shape) and buf.shape[0] >= n_out
                    and _cl(buf) == (cl and len(x_shape) == 4))
        if not in_place:
            cap = n_out + (16 if self.max_len is None else max(0, self.max_len + 2 - n_out))
            buf = _new_stack(cap, x_shape, v, cl)
        g_in = buf[:n_out]
        raw = torch.empty((n_out, x_shape[0]), dtype=_acc(v), device=v.device)
        if g_ref is not None:
            gf = (_mem_flat(g_ref.detach().contiguous(memory_format=torch.channels_last), 1) if _cl(g_in)
                  else g_ref.detach().flatten(1))
            gf_acc = gf.to(raw.dtype)
            dots = torch.empty_like(raw)
            total = torch.zeros(gf.numel(), dtype=v.dtype, device=v.device)
            w_tot = torch.exp(new).to(v.dtype)
        per = max(1, int(self.chunk_elems // max(1, math.prod(x_shape))))
        for a in reversed(range(0, n_out, per)):
            b = min(n_out, a + per)
            he = min(b, m)                             # shortcut side: entries a..he-1 (below m)
            bs, be = max(a, 1) - 1, min(b, mb + 1) - 1  # branch side: entries bs..be-1 feed a+..b-1
            lo, hi = (bs if be > bs else a), min(b, m)
            if split is None:
                gh, gr = v[lo:hi], v[lo:hi]
            else:                                      # post and combine, on the entries this chunk reads
                gh, gr = split.run([v[lo:hi]])[:2]
                gh = gh if gh is not None else torch.zeros_like(v[lo:hi])
                gr = gr if gr is not None else torch.zeros_like(v[lo:hi])
            # every product this chunk needs, before any of its entries is written
            sx = p_h.run([gh[a - lo:he - lo]])[0] if he > a and p_h.reached[0] else None
            bx = None
            if be > bs and p_r.reached[0]:
                if fr is not None and be == mb:        # the remainder rides with g^(K): one product
                    bin_ = gr[bs - lo:be - lo] * _bcast(fb[bs:be], gr)
                    bin_[-1].add_(gr[m - 1 - lo] * fr.to(gr.dtype))
                    (bx,) = p_r.run([bin_])
                    fbx = None
                else:                                  # B is linear: its scale goes into the add
                    (bx,) = p_r.run([gr[bs - lo:be - lo]])
                    fbx = _bcast(fb[bs:be], bx)
            out = g_in[a:b]
            if sx is not None and _aliases(sx, buf) and not _same_view(sx, out[:he - a]):
                sx = sx.clone()
            if bx is not None and _aliases(bx, buf):
                bx = bx.clone()
            if sx is not None and _same_view(sx, out[:he - a]) and all(unit_fh[a:he]):
                pass                                   # in place, scale kept: nothing to do
            elif sx is not None:
                torch.mul(sx, _bcast(fh[a:he], sx), out=out[:he - a])
            elif he > a:
                out[:he - a].zero_()
            if b > he:
                out[he - a:].zero_()
            if bx is not None:
                dst = out[bs + 1 - a:be + 1 - a]
                dst.add_(bx) if fbx is None else dst.addcmul_(bx, fbx)
            flat = _mem_flat(out, 2)                   # while in cache: norms, and dots and the sum with g
            raw[a:b] = torch.linalg.vector_norm(flat, dim=2, dtype=raw.dtype)
            if g_ref is not None:
                fa = flat.to(raw.dtype)
                for j in range(fa.shape[1]):            # one matrix-vector product per sample: no copy
                    torch.mv(fa[:, j], gf_acc[j], out=dots[a:b, j])
                total.addmv_(flat.reshape(b - a, -1).t(), w_tot[a:b])
        if g_ref is None:
            return PathStack(g_in, new, remainder, raw, buf)
        return PathStack(g_in, new, remainder, raw, buf, g_ref, dots, total)

    def through_unit(self, unit: UnitGraph, stack: PathStack, g: Optional[Tensor] = None) -> PathStack:
        """The stack at the unit's input from the stack at its output.

        ``stack`` is consumed: the fast route writes the result into its buffer where the
        shapes allow (take what you need from it, e.g. ``values()``, before this call).
        ``g``: dE/dx at the unit's input, when known: the fast route then takes the result's
        ``per_sample_dots(g)`` and ``closure_error(g)`` while each chunk is in cache.
        """
        progs = self._fast(unit, stack.v)
        if progs is not None:
            out = self._through_unit_fast(progs, stack, tuple(unit.x_shape), g)
            unit.fast = None     # the programs hold masks and normalised inputs: free them now
            return out
        v, ls = stack.v, stack.log_scale
        gh, gr, gx = self.split(unit, v)
        m = v.shape[0]
        neg = torch.full((1,), -float("inf"), dtype=ls.dtype, device=ls.device)
        K = self.max_len
        if not stack.remainder:
            # entry k: shortcut side of entry k, branch side of entry k-1; the new last entry
            # is length m (or the remainder, when m - 1 == max_len)
            ls_h, ls_b = torch.cat([ls, neg]), torch.cat([neg, ls])
            new = torch.maximum(ls_h, ls_b)
            fh, fb = torch.exp(ls_h - new), torch.exp(ls_b - new)
            out_h = _shift_scaled(gh, fh, up=False)
            out_r = _shift_scaled(gr, fb, up=True)
            out_x = _shift_scaled(gx, fb, up=True) if gx is not None else None
            remainder = K is not None and m == K + 1
        else:
            # entries 0..K and R: entry k <= K as above; R = S(R) + B(R + g^(K))
            ls_k, ls_r = ls[:m - 1], ls[m - 1:]
            ls_h = ls
            ls_b = torch.cat([neg, ls_k[:-1], torch.maximum(ls_k[-1:], ls_r)])
            new = torch.maximum(ls_h, ls_b)
            fh = torch.exp(ls_h - new)
            out_h = gh * _bcast(fh, gh)

            def shifted(g: Tensor) -> Tensor:
                fk = torch.exp(ls_k[-1:] - new[-1:])
                fr = torch.exp(ls_r - new[-1:])
                lower = g[:m - 2] * _bcast(torch.exp(ls_k[:-1] - new[1:m - 1]), g[:m - 2])
                tail = g[m - 2:m - 1] * _bcast(fk, g) + g[m - 1:] * _bcast(fr, g)
                return torch.cat([torch.zeros_like(g[:1]), lower, tail])
            out_r = shifted(gr)
            out_x = shifted(gx) if gx is not None else None
            remainder = True
        outs, grads = [unit.h, unit.r], [out_h, out_r]
        if out_x is not None and unit.gate is None:
            outs.append(unit.xc)
            grads.append(out_x)
        (g_in,) = self._vjp(outs, [unit.x], grads)
        if out_x is not None and unit.gate is not None:   # the gate's path is already at x
            g_in = g_in + out_x
        g_in, new = _rescale(g_in, new)
        return PathStack(g_in, new, remainder)

    def through_link(self, x_next: Any, out_prev: Any, stack: PathStack) -> PathStack:
        """Through the operations between one unit's output and the next unit's input (no branch)."""
        (g,) = self._vjp([x_next], [out_prev], [stack.v])
        v, ls = _rescale(g, stack.log_scale)
        return PathStack(v, ls, stack.remainder)

    # -- Veit's sampled paths ------------------------------------------------------------

    def through_unit_sampled(self, unit: UnitGraph, v: Tensor, ls: Tensor,
                             branch: Tensor) -> tuple[Tensor, Tensor]:
        """One sampled path per entry: entry i passes the unit's branch if ``branch[i]``, else its shortcut.

        Args:
            v, ls: [S, *out.shape] and [S] float64, as in a PathStack.
            branch: [S] bool.
        Returns:
            (v, ls) at the unit's input.
        """
        gh, gr, gx = self.split(unit, v)
        out = None
        idx_b = branch.nonzero().flatten()
        idx_s = (~branch).nonzero().flatten()
        if idx_b.numel():
            outs, grads = [unit.r], [gr.index_select(0, idx_b)]
            if gx is not None and unit.gate is None:
                outs.append(unit.xc)
                grads.append(gx.index_select(0, idx_b))
            (gb,) = self._vjp(outs, [unit.x], grads)
            if gx is not None and unit.gate is not None:
                gb = gb + gx.index_select(0, idx_b)
            out = gb.new_zeros((v.shape[0],) + gb.shape[1:])
            out.index_copy_(0, idx_b, gb)
        if idx_s.numel():
            (gs,) = self._vjp([unit.h], [unit.x], [gh.index_select(0, idx_s)])
            if out is None:
                out = gs.new_zeros((v.shape[0],) + gs.shape[1:])
            out.index_copy_(0, idx_s, gs)
        return _rescale(out, ls)


def _vjp(outputs: list, inputs: list, grads: list, allow_unused: bool = False, batched: bool = True):
    """Vector-Jacobian products of every entry of the stacks ``grads`` through the recorded graph (kept).

    ``batched``: one ``autograd.grad(..., is_grads_batched=True)`` call (torch.vmap; fast on
    CUDA, where one large kernel beats many small ones), else one call per entry (on the
    CPU vmap's batching rules cost 2-5x a loop: benchmarks/paths_bench.py).
    """
    try:
        if batched:
            return torch.autograd.grad(outputs, inputs, grads, retain_graph=True, allow_unused=allow_unused,
                                       is_grads_batched=True)
        m = grads[0].shape[0]
        outs: list = [None] * len(inputs)
        for i in range(m):
            gs = torch.autograd.grad(outputs, inputs, [g[i] for g in grads], retain_graph=True,
                                     allow_unused=allow_unused)
            for j, g in enumerate(gs):
                if g is None:
                    continue
                if outs[j] is None:
                    outs[j] = g.new_empty((m,) + g.shape)
                outs[j][i] = g
        return tuple(outs)
    except RuntimeError as e:
        raise GradflowError(
            f"gradflow could not take the vector-Jacobian products through a unit's recorded graph ({e}). "
            + ("Operations without a batching rule for torch.vmap (some custom autograd Functions) need "
               "batched=False; " if batched else "") + "declare the unit's parts without them") from e


# --- tables -------------------------------------------------------------------------------------

def n_paths(n: int, k: int, max_len: Optional[int]) -> float:
    """Paths through exactly k of n branches; k = -1: through more than ``max_len``."""
    if k >= 0:
        return float(math.comb(n, k)) if n < 1000 else math.exp(
            math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1))
    return float(sum(math.comb(n, j) for j in range(max_len + 1, n + 1)))


def stack_rows(ks: list, norms, dots, gnorm, meta: dict, n_units: int, max_len: Optional[int]) -> list:
    """Tidy rows (one per k) from per-sample arrays: norms, dots [M, B] and ||dE/dx_l|| [B] (numpy)."""
    safe = np.where(gnorm > 0, gnorm, np.nan)
    q = np.quantile(norms, [0.05, 0.5, 0.95], axis=1)
    mean, std = norms.mean(axis=1), norms.std(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.nanmean(norms / safe, axis=1) if np.isfinite(safe).any() else np.full(len(ks), np.nan)
        proj = np.nanmean(dots / safe ** 2, axis=1) if np.isfinite(safe).any() else np.full(len(ks), np.nan)
    g_mean = gnorm.mean()
    return [dict(meta, k=k, n_units=n_units, n_paths=n_paths(n_units, k, max_len), norm=mean[i],
                 norm_std=std[i], norm_q05=q[0, i], norm_q50=q[1, i], norm_q95=q[2, i],
                 share=share[i], proj=proj[i], grad_norm=g_mean) for i, k in enumerate(ks)]


def is_plain_sum(parts) -> bool:
    """y = h + F with no after-addition function (the zoo's ``Sum`` or the default combine)."""
    from ..parts import combine_sum
    if parts is None:
        return True
    return parts.post is None and (parts.combine is combine_sum or type(parts.combine).__name__ == "Sum")


class PathTracker:
    """The path-length split inside :func:`gradflow.trace` (``paths=True`` or ``paths=max_len``).

    The tracer calls :meth:`on_tap` at each unit's forward (its tensors), :meth:`on_top`
    when dE/dx_L arrives and :meth:`on_grad` when dE/dx_l is complete, inside its own
    re-entrancy guard. As for the direct term, the stack at unit l's input is computed
    when dE/dx_{l+1} is known, before autograd has freed unit l's part of the graph. A
    gate's own path to x (g(x) in the combine) comes from a second combine on detached
    h and F (a 1x1 conv recomputed per gated unit).
    """

    def __init__(self, max_len: Optional[int] = None):
        self.carrier = PathCarrier(max_len)
        self.max_len = max_len
        self._raw: list = []
        self._rows: list = []
        self.stopped: list = []        # units without parts, where the split stops

    def on_tap(self, call, *, x: Tensor, h: Tensor, r: Tensor, y: Tensor, out: Tensor, coef, parts) -> None:
        if not (torch.is_grad_enabled() and isinstance(out, Tensor) and out.requires_grad and x.requires_grad):
            return
        from torch.autograd.graph import get_gradient_edge as e
        gate = None
        if isinstance(coef, Tensor) and coef.requires_grad and parts is not None:
            gate, _ = parts.combine(h.detach(), r.detach(), x)
        call.path_graph = UnitGraph(   # on the call: dropped with it, whether or not a backward came
            x=e(x), h=e(h), r=e(r), out=e(out), plain_sum=gate is None and y is out and is_plain_sum(parts),
            name=call.info.name, y=e(y) if (gate is not None and y is not out) else None,
            gate=e(gate) if gate is not None else None, x_shape=tuple(x.shape))

    def on_top(self, last, g: Tensor) -> None:
        self._through(last, self.carrier.start(g))

    def _through(self, call, stack: PathStack) -> None:
        graph = getattr(call, "path_graph", None)
        if graph is None:
            if call.info.name not in self.stopped:
                self.stopped.append(call.info.name)
                import warnings
                warnings.warn(f"gradflow.trace(paths=...): unit {call.info.name!r} has no recorded parts (or no "
                              "gradient), so the path-length split stops there: the units below it get no "
                              "tr.paths rows. Declare its parts to split through it", RuntimeWarning, stacklevel=2)
            return
        call.path_stack = self.carrier.through_unit(graph, stack)

    def on_grad(self, call, g: Tensor, p: int = 0, keep=None) -> None:
        """dE/dx_l of unit ``call`` is complete: record its components and carry them to the unit below.

        ``keep(t)``, when given, receives the components [K+1, *x_l.shape] (float64).
        """
        stack, call.path_stack = getattr(call, "path_stack", None), None
        if stack is None:
            return
        m = call.micro
        gd = g.detach()
        self._raw.append((dict(step=m.step, micro=m.micro, backward=p, unit=call.index, name=call.info.name,
                               stage=call.info.stage),
                          len(m.calls) - call.index, stack.ks, stack.per_sample_norms(),
                          stack.per_sample_dots(gd),
                          torch.linalg.vector_norm(gd.flatten(1), dim=1, dtype=torch.float64)))
        if keep is not None:
            keep(stack.values())
        if call.index > 0:
            prev = m.calls[call.index - 1]
            if getattr(call, "link_edges", None) is not None:
                stack = self.carrier.through_link(call.link_edges[0], call.link_edges[1], stack)
            self._through(prev, stack)

    def table(self):
        """One row per recorded unit, backward pass and path length (k = -1: the remainder)."""
        import pandas as pd
        for meta, n, ks, norms, dots, gn in self._raw:
            self._rows += stack_rows(ks, norms.cpu().numpy(), dots.cpu().numpy(), gn.cpu().numpy(), meta, n,
                                     self.max_len)
        self._raw.clear()
        if not self._rows:
            return pd.DataFrame()
        t = pd.DataFrame(self._rows)
        t["_k"] = t["k"].where(t["k"] >= 0, 10 ** 9)
        return t.sort_values(["step", "micro", "backward", "unit", "_k"]).drop(columns="_k").reset_index(drop=True)
