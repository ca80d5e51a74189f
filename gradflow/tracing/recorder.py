"""The tracer: records per-unit activations and dE/dx_l, and splits dE/dx_l.

Usage::

    with gradflow.trace(model) as tr:     # hooks attached here, removed on exit
        loss = criterion(model(x), y)
        loss.backward()
    tr.units                              # one row per unit per recorded step

How it works, and its sharp edges
---------------------------------
* Each unit's ``forward`` is replaced, for the duration of the ``with`` block,
  by one that evaluates the unit from its parts (:func:`gradflow.parts.run_parts`;
  for gradflow's own units that is exactly their forward) and hands every
  intermediate to the recorder. Units known only by input and output run their
  own forward. Everything is restored on exit, exceptions included.
* Gradients are captured with ``Tensor.register_hook`` on each unit's input,
  not with module backward hooks, so in-place operations inside a block, units
  whose input does not require grad and modules called more than once are fine.
* The direct term of eq. (5)/(8) is dE/dx_L carried back through the shortcut
  side only. It is computed during the backward pass: when dE/dx_{l+1} is
  complete, unit l's part of the graph has not run yet, and a small re-entrant
  ``autograd.grad`` through its after-addition activation and shortcut, at
  the recorded forward (same BN batch statistics, same dropout masks, no
  running-statistic update, no random numbers drawn), gives direct_l. The
  residual term is total - direct.
* Per-sample statistics are reduced on the device inside the hooks and moved
  to the host once per step. No activation or gradient outlives the step
  unless ``keep=`` asks for it.
* ``torch.compile``d models are refused with a message: trace the original
  module. Under ``torch.no_grad()`` only activations are recorded.
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

from ..errors import GradflowError
from ..parts import run_parts
from . import stats
from .discover import PartsSpec, UnitInfo, UnitsSpec, find_units
from .schedule import as_schedule
from .tables import RAW, derive, step_tables

@dataclass
class _Call:
    """One call of one unit in one step: stats (device tensors [B]) and graph edges."""

    info: UnitInfo
    index: int
    stats: dict = field(default_factory=dict)
    x_edge: Any = None
    out_edge: Any = None
    y_edge: Any = None
    h_edge: Any = None
    coef: Any = 1.0
    has_post: bool = False
    identity_shortcut: bool = True
    direct: Optional[Tensor] = None     # direct term at this unit's input, while pending
    ref: Optional[Tensor] = None        # the same with every h-coefficient set to 1
    link_edges: Optional[tuple] = None  # (x_edge, previous out_edge) when ops sit between units
    direct_norm: Optional[Tensor] = None  # its per-sample norm, when already known
    d_ls: Any = 0.0                     # direct = exp(d_ls) * direct: deep products underflow float32
    r_ls: Any = 0.0                     # the same for ref
    carries: int = 0                    # changed carries since the last rescale
    x_shape: str = ""
    out_shape: str = ""
    scalars: dict = field(default_factory=dict)  # batch-level numbers (Jacobian spectra)


class Tracer:
    """Attach with ``with Tracer(model) as tr`` (or :func:`trace`); read ``tr.units``.

    Parameters
    ----------
    units, parts
        Which modules are residual units and what their parts are; see
        :func:`gradflow.tracing.find_units`. By default they are found.
    split
        Compute the direct/residual split of dE/dx_l (eq. 5 and 8).
    schedule
        When to record: None (every step), an int n (every n-th), or a
        schedule such as ``gradflow.tracing.log_spaced()``. A step is one
        forward call of ``model`` and the backward that follows.
    keep
        Names of full tensors to keep per unit and step, moved to the CPU:
        any of ``"x"``, ``"grad"``, ``"direct"``. Off by default: they cost memory.
    cancel_tol
        A sample counts as "residual cancels direct" when
        ||dE/dx_l|| < cancel_tol * ||direct_l||.
    spectra
        Also estimate, per unit and recorded step, the top singular value of
        the unit's Jacobian and of its branch's, and ||J - I||_2
        (:mod:`gradflow.theory.jacobian`). Dear: off by default.
    """

    def __init__(self, model: nn.Module, units: UnitsSpec = None, parts: PartsSpec = None,
                 split: bool = True, schedule=None, keep: Sequence[str] = (),
                 cancel_tol: float = 0.1, spectra: bool = False, spectra_iters: int = 20):
        bad = set(keep) - {"x", "grad", "direct"}
        if bad:
            raise GradflowError(f"keep={sorted(bad)!r}: choose from 'x', 'grad', 'direct'")
        self.model = model
        self.infos = find_units(model, units, parts)
        self.split = split
        self.schedule = as_schedule(schedule)
        self.keep = tuple(keep)
        self.cancel_tol = cancel_tol
        self.spectra, self.spectra_iters = spectra, spectra_iters
        self.step = -1              # index of the current step (forward call of the model)
        self.tensors: dict = {}     # (step, unit) -> {name: CPU tensor}, when keep= is set
        self._units: list[pd.DataFrame] = []
        self._samples: list[pd.DataFrame] = []
        self._calls: list[_Call] = []
        self._top: Optional[Tensor] = None      # per-sample ||dE/dx_L||
        self._last_out: Optional[Tensor] = None  # x_L so far: the last unit's output
        self._recording = False
        self._busy = False          # inside our own re-entrant autograd.grad
        self._top_handle = None
        self._handles: list = []
        self._buffers: dict = {}    # scratch tensors for the residual term, per shape
        self._patched: list = []
        self._attached = False

    # -- attach / detach -------------------------------------------------------------

    def __enter__(self) -> "Tracer":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> "Tracer":
        if self._attached:
            return self
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_forward))
        for info in self.infos:
            self._patch(info)
        self._attached = True
        return self

    def detach(self) -> None:
        """Remove every hook and restore every patched forward; flush the last step."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module, had, old in reversed(self._patched):
            if had:
                module.forward = old
            else:
                del module.forward
        self._patched.clear()
        self._attached = False
        self._flush()

    def _patch(self, info: UnitInfo) -> None:
        module = info.module
        had = "forward" in module.__dict__
        old = module.__dict__.get("forward")
        original = module.forward
        parts = info.parts() if info.parts is not None else None
        tracer = self

        def forward(self_module, *args, **kwargs):
            if tracer.step < 0:   # a unit called before any forward of the model itself
                tracer.next_step()
            if not tracer._recording:
                return original(*args, **kwargs)
            return tracer._run_unit(info, parts, original, args, kwargs)

        module.forward = types.MethodType(forward, module)
        self._patched.append((module, had, old))

    # -- forward ----------------------------------------------------------------------

    def _on_model_forward(self, module, args) -> None:
        self.next_step()

    def next_step(self) -> None:
        """Close the current step and open the next one.

        Each forward call of the traced model does this; call it yourself when
        you run units or submodules directly, which otherwise join the open step.
        """
        self._flush()
        self.step += 1
        self._recording = bool(self.schedule(self.step))

    def _run_unit(self, info: UnitInfo, parts, original, args, kwargs):
        x = args[0]
        grad = torch.is_grad_enabled() and isinstance(x, Tensor) and x.is_floating_point()
        if grad and not x.requires_grad:        # e.g. a frozen stem: make dE/dx_0 exist
            x = x.detach().requires_grad_()
            args = (x,) + tuple(args[1:])
        call = _Call(info, len(self._calls))
        if parts is not None and not kwargs and len(args) == 1:
            if self.spectra:
                from ..theory.jacobian import unit_spectra
                call.scalars = unit_spectra(info.module, parts, x, self.spectra_iters)
            out = run_parts(parts, x, tap=lambda **t: self._tap(call, grad, **t))
            call.identity_shortcut = parts.shortcut is None
            call.has_post = parts.post is not None
        else:
            out = original(*args, **kwargs)
            self._tap_x(call, x)
        call.out_shape = _shape(out)
        self._after_unit(call, x, out, grad)
        return out

    def _tap_x(self, call: _Call, x: Tensor) -> None:
        call.x_shape = _shape(x)
        call.stats["x_norm"] = stats.norm(x)
        call.stats["x_mean"] = stats.mean(x)

    def _tap(self, call: _Call, grad: bool, *, x, z, s_in, h, r, y, coef, out) -> None:
        self._tap_x(call, x)
        s = call.stats
        s["h_norm"] = s["x_norm"] if h.data_ptr() == x.data_ptr() and h.shape == x.shape else stats.norm(h)
        s["r_norm"] = stats.norm(r)
        if isinstance(coef, Tensor):
            s["coef"] = stats.mean(coef)
        call.coef = coef.detach() if isinstance(coef, Tensor) else float(coef)
        if grad and self.split and out.requires_grad:
            call.y_edge = get_gradient_edge(y) if y is not out else None
            call.h_edge = get_gradient_edge(h)

    def _after_unit(self, call: _Call, x: Tensor, out: Tensor, grad: bool) -> None:
        if "x" in self.keep:
            self._keep(call, "x", x)
        prev_out, self._last_out = self._last_out, out
        self._calls.append(call)
        if not (grad and isinstance(out, Tensor) and out.requires_grad):
            return
        if self.split:
            call.x_edge = get_gradient_edge(x)
            call.out_edge = get_gradient_edge(out)
            prev = self._calls[-2] if len(self._calls) > 1 else None
            if prev is not None and prev.out_edge is not None and x is not prev_out:
                call.link_edges = (call.x_edge, prev.out_edge)
        x.register_hook(lambda g, c=call: self._on_grad(c, g))
        # dE/dx_L arrives at the output of the last unit called; move that hook along.
        if self._top_handle is not None:
            self._top_handle.remove()
        self._top_handle = out.register_hook(lambda g, c=call: self._on_top_grad(c, g))

    # -- backward -----------------------------------------------------------------------

    def _on_top_grad(self, last: _Call, g: Tensor) -> None:
        if self._busy:
            return
        self._top = stats.norm(g)
        if self.split:
            self._carry(last, g, g)

    def _on_grad(self, call: _Call, g: Tensor) -> None:
        if self._busy:
            return
        s = call.stats
        s["grad_norm"] = stats.norm(g)
        if "grad" in self.keep:
            self._keep(call, "grad", g)
        if not (self.split and call.direct is not None):
            return
        d = call.direct
        s["direct_norm"] = call.direct_norm if call.direct_norm is not None else stats.norm(d)
        s["direct_log_scale"] = _expand(call.d_ls, g)
        res = self._residual(g, d, call.d_ls)
        s["residual_norm"] = stats.norm(res)
        s["dot_direct_residual"] = stats.dot(d, res)   # times exp(direct_log_scale)
        s["ref_norm"] = s["direct_norm"] if call.ref is d else stats.norm(call.ref)
        s["ref_log_scale"] = _expand(call.r_ls, g)
        if "direct" in self.keep:
            self._keep(call, "direct", d * _exp(call.d_ls))
        if call.index > 0:
            prev = self._calls[call.index - 1]
            v, vr = d, call.ref
            if call.link_edges is not None:  # ops between the two units
                v, vr = self._grad(call.link_edges[0], call.link_edges[1], v, vr)
            self._carry(prev, v, vr, s["direct_norm"] if v is d else None,
                        call.d_ls, call.r_ls, call.carries)
        call.direct = call.ref = None

    def _residual(self, g: Tensor, d: Tensor, d_ls) -> Tensor:
        """g - exp(d_ls) d into a buffer reused across units of the same shape.

        A fresh tensor per unit would cost an allocation (and, on the CPU, page
        faults) per unit; the buffer lives until the step's tables are made.
        """
        key = (g.shape, g.dtype, g.device, g.stride())
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty_like(g)
        if isinstance(d_ls, Tensor):
            return torch.addcmul(g, d, torch.exp(d_ls).neg().to(d.dtype), out=buf)
        return torch.sub(g, d, alpha=math.exp(d_ls), out=buf)

    def _carry(self, call: _Call, v: Tensor, vr: Tensor, v_norm: Optional[Tensor] = None,
               d_ls=0.0, r_ls=0.0, carries: int = 0) -> None:
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
                v, d_ls = _rescale(v, d_ls)
                vr, r_ls = (v, d_ls) if same else _rescale(vr, r_ls)
        call.direct, call.ref, call.direct_norm = v, vr, v_norm
        call.d_ls, call.r_ls, call.carries = d_ls, r_ls, carries

    def _grad(self, out_edge, in_edge, v: Tensor, vr: Tensor):
        """Vector-Jacobian products of one piece of the recorded graph with v (and vr)."""
        self._busy = True
        try:
            ws = [v] if vr is v else [v, vr]
            gs = [torch.autograd.grad([out_edge], [in_edge], [w], retain_graph=True)[0] for w in ws]
            return gs[0], gs[-1]
        finally:
            self._busy = False

    def _keep(self, call: _Call, name: str, t: Tensor) -> None:
        self.tensors.setdefault((self.step, call.index), {})[name] = t.detach().to("cpu", copy=True)

    # -- tables -----------------------------------------------------------------------

    def _flush(self) -> None:
        """Move the finished step's statistics to the host in one transfer and tabulate them."""
        calls, self._calls = self._calls, []
        self._buffers.clear()
        top, self._top = self._top, None
        x_L, self._last_out = self._last_out, None
        if self._top_handle is not None:
            self._top_handle.remove()
            self._top_handle = None
        if not calls:
            return
        top_stats = {}
        if isinstance(x_L, Tensor):
            top_stats = {"x_norm": stats.norm(x_L), "x_mean": stats.mean(x_L)}
            if top is not None:
                zero = torch.zeros_like(top)
                top_stats.update(grad_norm=top, direct_norm=top, ref_norm=top, direct_log_scale=zero,
                                 ref_log_scale=zero,
                                 residual_norm=torch.zeros_like(top), dot_direct_residual=torch.zeros_like(top))
        rows = [c.stats for c in calls] + [top_stats]
        flat = [(i, k, t) for i, st in enumerate(rows) for k, t in st.items()]
        host = torch.stack([t for _, _, t in flat]).to("cpu", torch.float64).numpy()
        n, B = len(rows), host.shape[1]
        raw = {k: np.full((n, B), np.nan) for k in RAW if any(k in st for st in rows)}
        for (i, k, _), values in zip(flat, host):
            raw[k][i] = values
        shapes = [c.x_shape for c in calls] + [calls[-1].out_shape]
        numel = np.array([_numel(s) for s in shapes], dtype=float)
        top_row = raw["grad_norm"][n - 1] if "grad_norm" in top_stats else None  # ||dE/dx_L|| per sample
        q = derive(raw, numel, top_row, self.cancel_tol)
        last = calls[-1].info
        meta = [dict(unit=c.index, name=c.info.name, stage=c.info.stage, kind=c.info.kind, is_top=False,
                     scalar_coef=c.info.scalar_coef, x_shape=c.x_shape, **c.scalars) for c in calls]
        meta.append(dict(unit=len(calls), name="head_input", stage=last.stage, kind="x_L", is_top=True,
                         scalar_coef=np.nan, x_shape=calls[-1].out_shape))
        units, samples = step_tables(self.step, meta, q)
        self._units.append(units)
        self._samples.append(samples)

    @property
    def units(self) -> pd.DataFrame:
        """One row per unit per recorded step, plus an ``is_top`` row for x_L.

        Columns: identification (step, unit, name, stage, kind, x_shape), then each
        per-sample quantity's batch mean under its own name with ``_std``,
        ``_q05``, ``_q50`` and ``_q95`` beside it, ``x_var`` (variance over the
        batch's elements) and ``cancel_frac`` (share of samples where the
        residual term cancels the direct one).
        """
        self._flush_if_done()
        return pd.concat(self._units, ignore_index=True) if self._units else pd.DataFrame()

    @property
    def samples(self) -> pd.DataFrame:
        """One row per unit per sample per recorded step: the per-sample values."""
        self._flush_if_done()
        return pd.concat(self._samples, ignore_index=True) if self._samples else pd.DataFrame()

    def _flush_if_done(self) -> None:
        if self._calls and not self._busy:
            self._flush()

    def summary(self, **kwargs) -> dict:
        """Network-level fits against the paper's predictions (see :func:`gradflow.theory.summarize`)."""
        from ..theory import summarize
        return summarize(self.units, **kwargs)


_RESCALE_EVERY = 4


def _rescale(v: Tensor, ls):
    """v / max|v| and the log scale that undoes it, without a host synchronisation."""
    m = v.detach().abs().amax().float().clamp_min(1e-30)
    return v / m.to(v.dtype), ls + torch.log(m)


def _exp(ls):
    return torch.exp(ls) if isinstance(ls, Tensor) else math.exp(ls)


def _expand(ls, like: Tensor) -> Tensor:
    if isinstance(ls, Tensor):
        return ls.expand(like.shape[0])
    return torch.full((like.shape[0],), float(ls), device=like.device)


def _shape(t) -> str:
    return "x".join(map(str, t.shape[1:])) if isinstance(t, Tensor) else ""


def _numel(shape: str) -> int:
    return int(np.prod([int(v) for v in shape.split("x")])) if shape else 1

def trace(model: nn.Module, units: UnitsSpec = None, parts: PartsSpec = None, **kwargs) -> Tracer:
    """Trace ``model``'s residual units; use as ``with trace(model) as tr:``.

    See :class:`Tracer` for the options and the sharp edges.
    """
    return Tracer(model, units=units, parts=parts, **kwargs)
