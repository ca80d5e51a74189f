"""The fast route of the path split: all components through a unit at once (see
:mod:`gradflow.tracing.paths.carrier` for the recursion, :mod:`gradflow.tracing.paths.vjp`
for the batched products)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from gradflow.tracing.paths.stack import PathStack, accumulation_dtype, broadcast_to, is_channels_last, memory_flat, new_stack
from gradflow.tracing.paths.vjp import compile_vjp


_KEEP_SCALE = 8.0    # natural log: an entry keeps its log scale while its norm stays within e^+-8 of 1


def _aliases(t: Tensor, buf: Tensor) -> bool:
    return t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()


def _same_view(a: Tensor, b: Tensor) -> bool:
    """The same elements in the same places (an elementwise op from a into b is then safe in place)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def compile_unit(unit, device_type: str, fast: bool = True):
    """(split, shortcut, branch, channels_last) programs for one recorded unit call (a
    :class:`~gradflow.tracing.paths.carrier.UnitGraph`), or why not (str)."""
    if not fast:
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


def through_unit_fast(progs: tuple, stack: PathStack, x_shape: tuple, max_len: Optional[int],
                      chunk_elems: int, g_ref: Optional[Tensor] = None) -> PathStack:
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
        remainder = max_len is not None and m == max_len + 1
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
                and is_channels_last(buf) == (cl and len(x_shape) == 4))
    if not in_place:
        cap = n_out + (16 if max_len is None else max(0, max_len + 2 - n_out))
        buf = new_stack(cap, x_shape, v, cl)
    g_in = buf[:n_out]
    raw = torch.empty((n_out, x_shape[0]), dtype=accumulation_dtype(v), device=v.device)
    if g_ref is not None:
        gf = (memory_flat(g_ref.detach().contiguous(memory_format=torch.channels_last), 1) if is_channels_last(g_in)
              else g_ref.detach().flatten(1))
        gf_acc = gf.to(raw.dtype)
        dots = torch.empty_like(raw)
        total = torch.zeros(gf.numel(), dtype=v.dtype, device=v.device)
        w_tot = torch.exp(new).to(v.dtype)
    per = max(1, int(chunk_elems // max(1, math.prod(x_shape))))
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
                bin_ = gr[bs - lo:be - lo] * broadcast_to(fb[bs:be], gr)
                bin_[-1].add_(gr[m - 1 - lo] * fr.to(gr.dtype))
                (bx,) = p_r.run([bin_])
                fbx = None
            else:                                  # B is linear: its scale goes into the add
                (bx,) = p_r.run([gr[bs - lo:be - lo]])
                fbx = broadcast_to(fb[bs:be], bx)
        out = g_in[a:b]
        if sx is not None and _aliases(sx, buf) and not _same_view(sx, out[:he - a]):
            sx = sx.clone()
        if bx is not None and _aliases(bx, buf):
            bx = bx.clone()
        if sx is not None and _same_view(sx, out[:he - a]) and all(unit_fh[a:he]):
            pass                                   # in place, scale kept: nothing to do
        elif sx is not None:
            torch.mul(sx, broadcast_to(fh[a:he], sx), out=out[:he - a])
        elif he > a:
            out[:he - a].zero_()
        if b > he:
            out[he - a:].zero_()
        if bx is not None:
            dst = out[bs + 1 - a:be + 1 - a]
            dst.add_(bx) if fbx is None else dst.addcmul_(bx, fbx)
        flat = memory_flat(out, 2)                   # while in cache: norms, and dots and the sum with g
        raw[a:b] = torch.linalg.vector_norm(flat, dim=2, dtype=raw.dtype)
        if g_ref is not None:
            fa = flat.to(raw.dtype)
            for j in range(fa.shape[1]):            # one matrix-vector product per sample: no copy
                torch.mv(fa[:, j], gf_acc[j], out=dots[a:b, j])
            total.addmv_(flat.reshape(b - a, -1).t(), w_tot[a:b])
    if g_ref is None:
        return PathStack(g_in, new, remainder, raw, buf)
    return PathStack(g_in, new, remainder, raw, buf, g_ref, dots, total)
