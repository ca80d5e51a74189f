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
(:mod:`gradflow.tracing.paths.vjp`), a few entries at a time, in place; where a
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

from gradflow.errors import GradflowError
from gradflow.tracing.paths.fast import compile_unit, through_unit_fast
from gradflow.tracing.paths.stack import PathStack, broadcast_to, rescaled, shift_scaled

__all__ = ["UnitGraph", "PathStack", "PathCarrier", "PathTracker", "n_paths", "stack_rows", "is_plain_sum"]


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


class PathCarrier:
    """Carries a :class:`PathStack` from a unit's output to its input.

    Args:
        max_len: the longest path length kept as its own entry; longer paths
            are summed into one remainder entry. None keeps every length.
        batched: where autograd takes the products: one vmap'ed ``autograd.grad`` per
            product (True) or one call per entry (False); None: batched on CUDA, a loop
            elsewhere (see :func:`_vjp`).
        fast: True (default): every component through a unit in one product per node of
            its graph, from the forward's saved tensors (:mod:`gradflow.tracing.paths.vjp`),
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
        v, ls = rescaled(g_top.detach().unsqueeze(0).clone(), ls)   # never scale the real gradient
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
            unit.fast = compile_unit(unit, v.device.type, self.fast)
            self.route[unit.name] = "fast" if isinstance(unit.fast, tuple) else f"autograd: {unit.fast}"
        return unit.fast if isinstance(unit.fast, tuple) else None

    def through_unit(self, unit: UnitGraph, stack: PathStack, g: Optional[Tensor] = None) -> PathStack:
        """The stack at the unit's input from the stack at its output.

        ``stack`` is consumed: the fast route writes the result into its buffer where the
        shapes allow (take what you need from it, e.g. ``values()``, before this call).
        ``g``: dE/dx at the unit's input, when known: the fast route then takes the result's
        ``per_sample_dots(g)`` and ``closure_error(g)`` while each chunk is in cache.
        """
        progs = self._fast(unit, stack.v)
        if progs is not None:
            out = through_unit_fast(progs, stack, tuple(unit.x_shape), self.max_len, self.chunk_elems, g)
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
            out_h = shift_scaled(gh, fh, up=False)
            out_r = shift_scaled(gr, fb, up=True)
            out_x = shift_scaled(gx, fb, up=True) if gx is not None else None
            remainder = K is not None and m == K + 1
        else:
            # entries 0..K and R: entry k <= K as above; R = S(R) + B(R + g^(K))
            ls_k, ls_r = ls[:m - 1], ls[m - 1:]
            ls_h = ls
            ls_b = torch.cat([neg, ls_k[:-1], torch.maximum(ls_k[-1:], ls_r)])
            new = torch.maximum(ls_h, ls_b)
            fh = torch.exp(ls_h - new)
            out_h = gh * broadcast_to(fh, gh)

            def shifted(g: Tensor) -> Tensor:
                fk = torch.exp(ls_k[-1:] - new[-1:])
                fr = torch.exp(ls_r - new[-1:])
                lower = g[:m - 2] * broadcast_to(torch.exp(ls_k[:-1] - new[1:m - 1]), g[:m - 2])
                tail = g[m - 2:m - 1] * broadcast_to(fk, g) + g[m - 1:] * broadcast_to(fr, g)
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
        g_in, new = rescaled(g_in, new)
        return PathStack(g_in, new, remainder)

    def through_link(self, x_next: Any, out_prev: Any, stack: PathStack) -> PathStack:
        """Through the operations between one unit's output and the next unit's input (no branch)."""
        (g,) = self._vjp([x_next], [out_prev], [stack.v])
        v, ls = rescaled(g, stack.log_scale)
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
        return rescaled(out, ls)


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
    from gradflow.tracing.parts import combine_sum
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
