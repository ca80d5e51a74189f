"""Residual networks as ensembles of paths (Veit, Wilber, Belongie 2016), measured exactly.

* :func:`path_components`: dE/dx_l split by path length k for every unit l, exactly
  (the chain rule through each unit's parts; see :mod:`gradflow.tracing.paths.carrier`),
  as a tidy table with one row per unit and length.
* :func:`sample_paths`: Veit's own estimate, as he describes it: in the backward
  pass k random units pass the gradient through their branch only, the others
  through their shortcut only; the norm of one sampled path's gradient per k
  (his Fig. 6b) and that times the number of paths of length k (Fig. 6c).
* :func:`path_counts`, :func:`effective_range`, :func:`compare_table` (from
  :mod:`gradflow.theory.paths`): the binomial distribution of path lengths, the
  shortest window of lengths holding 90% of the gradient, Veit beside exact.

Each call records one forward of the model with its own temporary taps
(:func:`gradflow.tracing.parts.run_parts`), then works on the recorded graph: nothing is
recomputed, BN uses the forward's batch statistics. The model is left as it was.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

from gradflow.errors import GradflowError
from gradflow.tracing.parts import Parts, Runner, patched_forwards, run_parts
from gradflow.tracing.discover import PartsSpec, UnitInfo, UnitsSpec, find_units
from gradflow.tracing.paths.carrier import PathCarrier, PathStack, UnitGraph, is_plain_sum, n_paths, stack_rows

__all__ = ["path_components", "sample_paths", "record", "PathResult", "Recording"]

LossFn = Callable[[Tensor], Tensor]


# --- recording one forward --------------------------------------------------------------

@dataclass
class _Rec:
    """One unit call: the tensors the carrier's edges point to."""

    info: UnitInfo
    x: Tensor
    out: Tensor
    h: Tensor
    r: Tensor
    xc: Optional[Tensor]
    plain_sum: bool
    y: Optional[Tensor] = None       # with ``gate``: y, when post follows it
    gate: Optional[Tensor] = None    # combine(h.detach(), F.detach(), x), the gate's own graph

    def graph(self) -> UnitGraph:
        e = get_gradient_edge
        return UnitGraph(x=e(self.x), h=e(self.h), r=e(self.r), out=e(self.out),
                         xc=e(self.xc) if self.xc is not None else None,
                         plain_sum=self.plain_sum, name=self.info.name,
                         y=e(self.y) if self.y is not None else None,
                         gate=e(self.gate) if self.gate is not None else None, x_shape=tuple(self.x.shape))


@dataclass
class Recording:
    """A recorded forward: the units' calls in order, the model's output and the loss."""

    calls: list
    output: Tensor
    loss: Tensor


def _recording_parts(parts: Parts, rec: dict) -> Parts:
    """The unit's parts with the combine reading an alias of x, so the gate's own path is separable."""
    combine = parts.combine

    def aliased(h, r, x):
        xc = x.view_as(x)
        rec["xc"] = xc
        return combine(h, r, xc)
    return Parts(branch=parts.branch, shortcut=parts.shortcut, combine=aliased, post=parts.post,
                 preact=parts.preact, shortcut_preact=parts.shortcut_preact)


class _Runner(Runner):
    """What a unit module's block calls for each of its units (see :mod:`gradflow.tracing.parts`): run and record."""

    def __init__(self, infos: list, calls: list, gate_rerun: bool = False):
        self.infos, self.calls, self.gate_rerun = infos, calls, gate_rerun

    def unit_name(self, k: int) -> str:
        return self._info(k).name

    def run_unit(self, k: int, parts: Parts, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        if torch.is_grad_enabled() and isinstance(x, Tensor) and not x.requires_grad:
            x = x.detach().requires_grad_()   # e.g. a frozen stem: dE/dx_0 must exist
        rec: dict = {}

        def tap(**t):
            rec.update(t)
        plain = is_plain_sum(parts)
        if self.gate_rerun:   # as inside gradflow.trace: the gate's path from a second combine
            out = run_parts(parts, x, tap, args, kwargs) if (args or kwargs) else run_parts(parts, x, tap)
            y, coef, gate = rec["y"], rec["coef"], None
            if isinstance(coef, Tensor) and coef.requires_grad:
                gate, _ = parts.combine(rec["h"].detach(), rec["r"].detach(), x)
            self.calls.append(_Rec(self._info(k), x, out, rec["h"], rec["r"], None, plain and gate is None,
                                   y if y is not out else None, gate))
            return out
        wrapped = _recording_parts(parts, rec)
        out = run_parts(wrapped, x, tap, args, kwargs) if (args or kwargs) else run_parts(wrapped, x, tap)
        self.calls.append(_Rec(self._info(k), x, out, rec["h"], rec["r"], None if plain else rec.get("xc"), plain))
        return out

    def run_add(self, k: int, x: Tensor, h: Tensor, r: Tensor) -> Tensor:
        """A unit known as an addition h + r of two tensors computed from x (found by torch.fx)."""
        h = h.view_as(h)        # a node of its own, even when h is x itself
        out = h + r
        self.calls.append(_Rec(self._info(k), x, out, h, r, None, True))
        return out

    def _info(self, k: int) -> UnitInfo:
        return self.infos[k] if k < len(self.infos) else self.infos[-1]


def _block_forward(p):
    """(forward(run, *args, **kwargs), names) from what ``UnitInfo.parts()`` returns: Parts or Block."""
    if isinstance(p, Parts):
        return (lambda run, x, *a, **kw: run.unit(0, p, x, *a, **kw)), ("",)
    return p.forward, tuple(p.names)


@contextmanager
def _taps(infos: list[UnitInfo], calls: list, gate_rerun: bool = False):
    """Patch each unit module's forward to run from its parts with our runner; restored on exit."""
    missing = [i.name for i in infos if i.parts is None]
    if missing:
        raise GradflowError(
            f"units {missing[:5]} have no parts, so their paths cannot be split: declare them, "
            "e.g. units=[...], parts={'shortcut': ..., 'branch': ...}")
    by_module: dict = {}
    for info in infos:
        by_module.setdefault(id(info.module), []).append(info)
    swaps = []
    for group in by_module.values():
        group = sorted(group, key=lambda i: getattr(i, "slot", 0))
        block_fwd, _ = _block_forward(group[0].parts())
        runner = _Runner(group, calls, gate_rerun)

        def forward(self_module, *args, _f=block_fwd, _run=runner, **kwargs):
            return _f(_run, *args, **kwargs)
        swaps.append((group[0].module, forward))
    with patched_forwards(swaps):
        yield


def record(model: nn.Module, x: Tensor, loss_fn: LossFn, units: UnitsSpec = None,
           parts: PartsSpec = None, _gate_rerun: bool = False) -> Recording:
    """One forward of ``model`` on ``x`` with every unit's h, F and combine recorded, and its loss.

    Args:
        model: any network whose units gradflow finds (or ``units``/``parts`` declare).
        x: the input batch.
        loss_fn: model output -> scalar loss.
    Returns:
        A :class:`Recording`; its graph is alive until it is dropped.
    """
    infos = find_units(model, units, parts)
    calls: list = []
    with torch.enable_grad(), _taps(infos, calls, _gate_rerun):
        output = model(x)
    if not calls:
        raise GradflowError("the forward called none of the units found; is x the model's input?")
    loss = loss_fn(output)
    if not (isinstance(loss, Tensor) and loss.numel() == 1 and loss.requires_grad):
        raise GradflowError("loss_fn(output) must return a scalar tensor that depends on the output "
                            "(e.g. lambda out: F.cross_entropy(out, y))")
    return Recording(calls, output, loss)


def _loss_fn(loss_fn: Optional[LossFn], y: Optional[Tensor]) -> LossFn:
    if loss_fn is not None:
        return loss_fn
    if y is None:
        raise GradflowError("give loss_fn (output -> scalar) or labels y (cross-entropy)")
    return lambda out: F.cross_entropy(out, y)


# --- the exact components ------------------------------------------------------------------

@dataclass
class PathResult:
    """What :func:`path_components` returns.

    ``table``: one row per unit and path length (k = -1: the remainder beyond
    max_len) with ``norm`` (batch mean of the per-sample ||g^(k)||) and its
    ``_std``, ``_q05``, ``_q50``, ``_q95``; ``share`` (mean of ||g^(k)|| /
    ||dE/dx_l||); ``proj`` (mean of <g^(k), dE/dx_l> / ||dE/dx_l||^2: these sum
    to 1 over k); ``n_paths`` (paths of that length from x_l to x_L);
    ``grad_norm`` (batch mean ||dE/dx_l||, plain autograd). ``units``: one row
    per unit with ``sum_rel_err``, the batch-max of ||sum_k g^(k) - dE/dx_l|| /
    ||dE/dx_l|| (float rounding only), and ``vjp``: "fast" where the products
    through the unit were batched from saved tensors, else "autograd: <why>".
    ``components``: with ``keep=True``,
    unit index -> float64 tensor [K+1, *x_l.shape].
    """

    table: pd.DataFrame
    units: pd.DataFrame
    components: dict = field(default_factory=dict)
    max_len: Optional[int] = None


def path_components(model: nn.Module, x: Tensor, loss_fn: Optional[LossFn] = None, y: Optional[Tensor] = None,
                    max_len: Optional[int] = None, keep: bool = False, units: UnitsSpec = None,
                    parts: PartsSpec = None, batched: Optional[bool] = None, fast: bool = True,
                    _gate_rerun: bool = False) -> PathResult:
    """dE/dx_l of every unit split by path length k, exactly, from one forward and backward.

    Args:
        model: a residual network (gradflow's zoo, torchvision, timm, or declared units).
        x: input batch; ``loss_fn`` (output -> scalar) or labels ``y`` (cross-entropy).
        max_len: keep lengths 0..max_len apart and sum the longer ones (k = -1); None: all.
        keep: also return the component tensors (float64, on the CPU).
        units: as for :func:`gradflow.trace`.
        parts: as for :func:`gradflow.trace`.
        batched: where autograd takes the products (units without ``fast`` rules): all
            components in one vmap'ed call (True) or one call each (False); None: batched
            on CUDA, one by one on the CPU (faster there).
        fast: all components through a unit in one product per node, from the forward's
            saved tensors, where the unit's graph has only nodes with rules
            (:mod:`gradflow.tracing.paths.vjp`: convolutions, BatchNorm, ReLU, sums, views);
            False: autograd for every unit. The units table's ``vjp`` column says which
            route each unit took (and why not the fast one).
    Returns:
        A :class:`PathResult`.
    """
    rec = record(model, x, _loss_fn(loss_fn, y), units, parts, _gate_rerun)
    calls = rec.calls
    xs = [c.x for c in calls]
    grads = torch.autograd.grad(rec.loss, xs + [calls[-1].out], retain_graph=True)
    carrier = PathCarrier(max_len, batched, fast)
    stack = carrier.start(grads[-1])
    n = len(calls)
    rows, unit_rows, kept = [], [], {}
    for i in reversed(range(n)):
        stack = carrier.through_unit(calls[i].graph(), stack, grads[i])
        rows += _rows(stack, grads[i], calls[i], i, n - i, max_len)
        unit_rows.append(_unit_row(stack, grads[i], calls[i], i))
        if keep:
            kept[i] = stack.values().cpu()
        if i > 0 and calls[i].x is not calls[i - 1].out:
            stack = carrier.through_link(get_gradient_edge(calls[i].x), get_gradient_edge(calls[i - 1].out),
                                         stack)
    del rec
    for r in unit_rows:
        r["vjp"] = carrier.route.get(r["name"], "autograd")
    table = pd.DataFrame(rows)
    table = table.assign(_k=table["k"].where(table["k"] >= 0, 10 ** 9)).sort_values(["unit", "_k"]).drop(columns="_k")
    units_df = pd.DataFrame(unit_rows).sort_values("unit").reset_index(drop=True)
    return PathResult(table.reset_index(drop=True), units_df, kept, max_len)


def _rows(stack: PathStack, g: Tensor, call: _Rec, unit: int, n_above: int, max_len) -> list[dict]:
    gn = torch.linalg.vector_norm(g.detach().flatten(1), dim=1, dtype=torch.float64).cpu().numpy()
    meta = dict(step=0, unit=unit, name=call.info.name, stage=call.info.stage)
    return stack_rows(stack.ks, stack.per_sample_norms().cpu().numpy(), stack.per_sample_dots(g).cpu().numpy(),
                      gn, meta, n_above, max_len)


def _unit_row(stack: PathStack, g: Tensor, call: _Rec, unit: int) -> dict:
    """The closure check: ||sum_k g^(k) - dE/dx_l|| / ||dE/dx_l||, batch max (in the gradient's dtype)."""
    err = stack.closure_error(g)
    return dict(unit=unit, name=call.info.name, stage=call.info.stage, x_shape="x".join(map(str, g.shape[1:])),
                sum_rel_err=float(err.max()))


def _n_paths(n: int, k: int, max_len) -> float:
    return n_paths(n, k, max_len)


# --- Veit's sampled estimate ---------------------------------------------------------------

def sample_paths(model: nn.Module, x: Tensor, loss_fn: Optional[LossFn] = None, y: Optional[Tensor] = None,
                 ks: Optional[Sequence[int]] = None, samples: int = 100, seed: int = 0, chunk: int = 64,
                 units: UnitsSpec = None, parts: PartsSpec = None,
                 batched: Optional[bool] = None) -> pd.DataFrame:
    """Veit et al.'s sampling estimate of the gradient per path length, at the first unit's input.

    For each k, ``samples`` times: k units chosen uniformly at random pass the
    gradient through their branch only, the others through their shortcut only
    (after-addition functions and combine coefficients included, as in the exact
    split). One sample is one path's gradient.

    Args:
        ks: the path lengths (default: 0..n); samples: paths drawn per k (Veit: 1,000);
        seed: the subsets' generator; chunk: paths carried together.
    Returns:
        One row per k: ``path_norm`` (mean over sampled paths of the batch-mean
        per-sample norm: Fig. 6b) with ``path_norm_std``; ``n_paths`` = C(n, k);
        ``total`` = path_norm x n_paths (Fig. 6c); ``unbiased_norm``: the norm
        of C(n, k) x the mean sampled path gradient, whose expectation is g^(k).
    """
    rec = record(model, x, _loss_fn(loss_fn, y), units, parts)
    calls = rec.calls
    n = len(calls)
    ks = list(range(n + 1)) if ks is None else [int(k) for k in ks]
    bad = [k for k in ks if not 0 <= k <= n]
    if bad:
        raise GradflowError(f"ks={bad!r}: path lengths must lie in 0..{n} (this network has {n} units)")
    if samples < 1:
        raise GradflowError(f"samples={samples!r} must be >= 1 (Veit used 1,000)")
    (g_top,) = torch.autograd.grad(rec.loss, [calls[-1].out], retain_graph=True)
    graphs = [c.graph() for c in calls]
    links = [None] + [(get_gradient_edge(calls[i].x), get_gradient_edge(calls[i - 1].out))
                      if calls[i].x is not calls[i - 1].out else None for i in range(1, n)]
    gen = torch.Generator().manual_seed(seed)
    plan = [(k, torch.randperm(n, generator=gen)[:k]) for k in ks for _ in range(samples)]
    carrier = PathCarrier(None, batched)
    norms: dict = {k: [] for k in ks}
    sums: dict = {}
    for lo in range(0, len(plan), chunk):
        part = plan[lo:lo + chunk]
        mask = torch.zeros(len(part), n, dtype=torch.bool)
        for j, (_, subset) in enumerate(part):
            mask[j, subset] = True
        mask = mask.to(g_top.device)
        v = g_top.detach().unsqueeze(0).expand(len(part), *g_top.shape).contiguous()
        ls = torch.zeros(len(part), dtype=torch.float64, device=g_top.device)
        for i in reversed(range(n)):
            v, ls = carrier.through_unit_sampled(graphs[i], v, ls, mask[:, i])
            if links[i] is not None:
                stack = carrier.through_link(links[i][0], links[i][1], PathStack(v, ls))
                v, ls = stack.v, stack.log_scale
        st = PathStack(v, ls)
        per = st.per_sample_norms().mean(dim=1).cpu().numpy()
        vals = st.values()
        for j, (k, _) in enumerate(part):
            norms[k].append(per[j])
            sums[k] = sums.get(k, 0) + vals[j]
    del rec
    rows = []
    for k in ks:
        a = np.asarray(norms[k])
        c = _n_paths(n, k, None)
        mean_vec = sums[k] / len(a)
        unb = torch.linalg.vector_norm((mean_vec * c).flatten(1), dim=1).mean().item()
        rows.append(dict(k=k, n_units=n, n_paths=c, samples=len(a), path_norm=a.mean(), path_norm_std=a.std(),
                         total=a.mean() * c, unbiased_norm=unb))
    return pd.DataFrame(rows)


