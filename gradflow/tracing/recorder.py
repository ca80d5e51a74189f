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
from typing import Any, Callable, Optional, Sequence

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

# Per-sample quantities in the tables, in column order.
QUANTITIES = ("x_norm", "x_rms", "x_mean", "h_norm", "r_norm", "coef", "grad_norm", "grad_ratio",
              "direct_norm", "direct_ratio", "ref_ratio", "residual_norm", "cos_direct_residual",
              "cancel")


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
    x_shape: str = ""
    scalars: dict = field(default_factory=dict)  # batch-level numbers (Jacobian spectra)
    out_shape: str = ""


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
        self._rows: list[dict] = []
        self._samples: list[pd.DataFrame] = []
        self._calls: list[_Call] = []
        self._recording = False
        self._busy = False          # inside our own re-entrant autograd.grad
        self._top_handle = None
        self._handles: list = []
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
        if self._top_handle is not None:
            self._top_handle.remove()
            self._top_handle = None
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
            if not tracer._recording:
                return original(*args, **kwargs)
            return tracer._run_unit(info, parts, original, args, kwargs)

        module.forward = types.MethodType(forward, module)
        self._patched.append((module, had, old))

    # -- forward ----------------------------------------------------------------------

    def _on_model_forward(self, module, args) -> None:
        self._flush()
        self.step += 1
        self._recording = bool(self.schedule(self.step))

    def _run_unit(self, info: UnitInfo, parts, original, args, kwargs):
        if not self._calls and self.step < 0:   # units called without the model: one step
            self._on_model_forward(self.model, args)
            if not self._recording:
                return original(*args, **kwargs)
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
            self._tap_io(call, x, out)
        self._after_unit(call, x, out, grad)
        return out

    def _tap_io(self, call: _Call, x: Tensor, out: Tensor) -> None:
        s = call.stats
        call.x_shape = "x".join(map(str, x.shape[1:]))
        call.out_shape = "x".join(map(str, out.shape[1:]))
        s["x_norm"] = stats.norm(x)
        s["x_rms"] = s["x_norm"] / math.sqrt(stats.numel_per_sample(x))
        s["x_mean"] = stats.mean(x)
        s["out_norm"] = stats.norm(out)
        s["out_rms"] = s["out_norm"] / math.sqrt(stats.numel_per_sample(out))
        s["out_mean"] = stats.mean(out)

    def _tap(self, call: _Call, grad: bool, *, x, z, s_in, h, r, y, coef, out) -> None:
        self._tap_io(call, x, out)
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
        self._calls.append(call)
        if not (grad and isinstance(out, Tensor) and out.requires_grad):
            return
        prev = self._calls[-2] if len(self._calls) > 1 else None
        if self.split:
            call.x_edge = get_gradient_edge(x)
            call.out_edge = get_gradient_edge(out)
            if prev is not None and prev.out_edge is not None and x is not self._last_out:
                call.link_edges = (call.x_edge, prev.out_edge)
        x.register_hook(lambda g, c=call: self._on_grad(c, g))
        # dE/dx_L arrives at the output of the last unit called; move the hook along.
        if self._top_handle is not None:
            self._top_handle.remove()
        self._top_handle = out.register_hook(lambda g, c=call: self._on_top_grad(c, g))
        self._last_out = out

    _last_out = None

    # -- backward -----------------------------------------------------------------------

    def _on_top_grad(self, last: _Call, g: Tensor) -> None:
        if self._busy:
            return
        self._top = stats.norm(g)
        self._top_out = {k: last.stats["out_" + k] for k in ("norm", "rms", "mean")}
        if self.split:
            self._carry(last, g, g)

    def _on_grad(self, call: _Call, g: Tensor) -> None:
        if self._busy:
            return
        s = call.stats
        s["grad_norm"] = stats.norm(g)
        top = getattr(self, "_top", None)
        if top is not None:
            s["grad_ratio"] = s["grad_norm"] / top
        if "grad" in self.keep:
            self._keep(call, "grad", g)
        if self.split and call.direct is not None:
            d, res = call.direct, g - call.direct
            dn, rn = stats.norm(d), stats.norm(res)
            s["direct_norm"], s["residual_norm"] = dn, rn
            s["cos_direct_residual"] = stats.dot(d, res) / (dn * rn).clamp_min(1e-30)
            s["cancel"] = (s["grad_norm"] < self.cancel_tol * dn).float()
            if top is not None:
                s["direct_ratio"] = dn / top
                s["ref_ratio"] = stats.norm(call.ref) / top
            if "direct" in self.keep:
                self._keep(call, "direct", d)
            if call.index > 0:
                prev = self._calls[call.index - 1]
                v, vr = call.direct, call.ref
                if call.link_edges is not None:  # ops between the two units
                    v, vr = self._grad(call.link_edges[0], call.link_edges[1], v, vr)
                self._carry(prev, v, vr)
            call.direct = call.ref = None

    def _carry(self, call: _Call, v: Tensor, vr: Tensor) -> None:
        """direct at unit ``call``'s input from direct at its output (and the same for ref)."""
        if call.out_edge is None or call.h_edge is None:
            return  # a unit without parts: the split stops here
        if call.has_post:
            v, vr = self._grad(call.out_edge, call.y_edge, v, vr)
        c = call.coef
        scaled = v * c if not (isinstance(c, float) and c == 1.0) else v
        if call.identity_shortcut:
            call.direct, call.ref = scaled, vr
        else:
            call.direct, call.ref = self._grad(call.h_edge, call.x_edge, scaled, vr)

    def _grad(self, out_edge, in_edge, v: Tensor, vr: Tensor):
        """Vector-Jacobian products of the same graph piece with two vectors."""
        same = vr is v
        self._busy = True
        try:
            if same:
                (g,) = torch.autograd.grad([out_edge], [in_edge], [v], retain_graph=True)
                return g, g
            g, gr = (torch.autograd.grad([out_edge], [in_edge], [w], retain_graph=True)[0]
                     for w in (v, vr))
            return g, gr
        finally:
            self._busy = False

    def _keep(self, call: _Call, name: str, t: Tensor) -> None:
        self.tensors.setdefault((self.step, call.index), {})[name] = t.detach().to("cpu", copy=True)

    # -- tables -----------------------------------------------------------------------

    def _flush(self) -> None:
        """Move the finished step's statistics to the host in one transfer."""
        calls, self._calls = self._calls, []
        top, self._top = getattr(self, "_top", None), None
        top_out = getattr(self, "_top_out", None)
        self._top_out = None
        self._last_out = None
        if self._top_handle is not None:
            self._top_handle.remove()
            self._top_handle = None
        if not calls:
            return
        keys = sorted({k for c in calls for k in c.stats})
        per_call = []
        for c in calls:
            per_call.append([c.stats.get(k) for k in keys])
        flat = [t for row in per_call for t in row if t is not None]
        extra = [top] if top is not None else []
        if top_out is not None:
            extra += [top_out["norm"], top_out["rms"], top_out["mean"]]
        host = torch.stack(flat + extra).cpu().double() if flat else None
        B = host.shape[1]
        it = iter(host)
        rows, samples = [], []
        for c, vals in zip(calls, per_call):
            d = {k: next(it).numpy() for k, v in zip(keys, vals) if v is not None}
            rows.append(self._row(c.index, c.info, d, B))
            rows[-1].update(c.scalars)
            rows[-1]["x_shape"] = c.x_shape
            samples.append(self._sample_frame(c.index, d, B))
        if top is not None:
            top_norm = next(it).numpy()
            d = {"grad_norm": top_norm, "grad_ratio": top_norm / top_norm,
                 "direct_ratio": top_norm / top_norm, "ref_ratio": top_norm / top_norm}
            if top_out is not None:
                d["x_norm"], d["x_rms"], d["x_mean"] = (next(it).numpy() for _ in range(3))
            last = calls[-1].info
            rows.append(self._row(len(calls), UnitInfo("head_input", last.module, "x_L", last.stage), d, B,
                                  is_top=True))
            rows[-1]["x_shape"] = calls[-1].out_shape
            samples.append(self._sample_frame(len(calls), d, B))
        for r in rows:
            r["step"] = self.step
        self._rows.extend(rows)
        df = pd.concat(samples, ignore_index=True)
        df.insert(0, "step", self.step)
        self._samples.append(df)

    def _row(self, index: int, info: UnitInfo, d: dict, B: int, is_top: bool = False) -> dict:
        row = {"step": self.step, "unit": index, "name": info.name, "stage": info.stage,
               "kind": info.kind, "is_top": is_top, "batch": B, "scalar_coef": info.scalar_coef}
        if "x_rms" in d:  # variance over all elements of the batch (equal counts per sample)
            row["x_var"] = float(np.mean(d["x_rms"] ** 2) - np.mean(d["x_mean"]) ** 2)
        for q, v in d.items():
            if q.startswith("out_"):
                continue
            row[q] = float(np.mean(v))
            if q in ("cancel",):
                continue
            row[q + "_std"] = float(np.std(v))
            row[q + "_q05"], row[q + "_q50"], row[q + "_q95"] = (float(x) for x in np.quantile(v, [0.05, 0.5, 0.95]))
        if "cancel" in d:
            row["cancel_frac"] = row.pop("cancel")
        return row

    @staticmethod
    def _sample_frame(index: int, d: dict, B: int) -> pd.DataFrame:
        cols = {"unit": index, "sample": range(B)}
        cols.update({q: v for q, v in d.items() if not q.startswith("out_")})
        return pd.DataFrame(cols)

    @property
    def units(self) -> pd.DataFrame:
        """One row per unit per recorded step: batch means plus _std/_q05/_q50/_q95 summaries."""
        self._flush_if_done()
        return pd.DataFrame(self._rows)

    @property
    def samples(self) -> pd.DataFrame:
        """One row per unit per sample per recorded step (the per-sample values)."""
        self._flush_if_done()
        return pd.concat(self._samples, ignore_index=True) if self._samples else pd.DataFrame()

    def _flush_if_done(self) -> None:
        if self._calls and not self._busy:
            self._flush()

    def summary(self, **kwargs) -> dict:
        """Network-level fits against the paper's predictions (see gradflow.theory)."""
        from ..theory import summarize
        return summarize(self.units, **kwargs)


def trace(model: nn.Module, units: UnitsSpec = None, parts: PartsSpec = None, **kwargs) -> Tracer:
    """Trace ``model``'s residual units; use as ``with trace(model) as tr:``.

    See :class:`Tracer` for the options and the sharp edges.
    """
    return Tracer(model, units=units, parts=parts, **kwargs)
