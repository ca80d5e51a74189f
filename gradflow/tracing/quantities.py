"""Measurements as small plug-ins, in the spirit of Cockpit's quantities.

A :class:`Quantity` says *what* it reduces, on *which* tensor and *when*:

* ``before(t)`` before a unit runs, on its input (for quantities that run the
  unit themselves, as :class:`Spectra` does: after the forward, restoring
  buffers would break the backward);
* ``forward(t)`` at each unit's call, with the unit's tensors (``t.x``, ``t.z``,
  ``t.h``, ``t.r``, ``t.y``, ``t.out``, ``t.coef``, and ``t.vjp(u)``: J_l^T u
  through the graph the unit just recorded; ``t.h`` is None for units
  known only by input and output, and for the ``x_L`` row, where ``t.is_top``);
  a quantity that reads only ``t.x`` says ``early = True`` and is computed as
  the unit is entered, while x_l is still in cache, instead of after its branch;
* ``backward(t)`` when dE/dx_l is complete (``t.grad``; with the split, the
  carried direct term, see :class:`Split`);
* ``weights(t)`` once per step on the unit's parameters (``t.params``, their
  ``.grad``; ``t.before`` holds the weights before the optimizer's update when
  the tracer was given an optimizer); ``weights_all(ts)`` gets every unit's at
  once (by default it calls ``weights`` per unit; the built-ins reduce all
  units' tensors in one batched call);
* ``should_compute(step)``: its own schedule (Cockpit's habit);
* ``derive(q, t)`` on the host, once per step: derived per-sample columns from
  the raw ones (``q``: name -> array [rows, batch]).

``forward``/``backward`` return per-sample reductions, tensors of shape [B]
kept on the device until the step's single host transfer; ``weights`` returns
0-d tensors (one number per unit). Under a process group (:mod:`.distributed`)
the names a quantity lists in ``summed`` are partial norms over the parameters
this rank holds, joined across ranks as the root of their sum of squares;
``finish(sc)`` then makes the columns from them on the host (the update ratio
from its two norms). Per-sample columns are listed in
``columns`` and get ``_std``, ``_q05``, ``_q50``, ``_q95`` beside their batch
mean in ``tr.units``; one-number columns are listed in ``scalars``.

Adding one (this is the README's example)::

    class XKurtosis(gradflow.tracing.Quantity):
        columns = ("x_kurtosis",)
        top = True                      # also on x_L
        early = True                    # reads only t.x: computed as the unit is entered
        def forward(self, t):
            x = t.x.detach().flatten(1).float()
            z = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
            return {"x_kurtosis": z.pow(4).mean(1)}

    with gradflow.trace(model, quantities=[XKurtosis()]) as tr: ...

The built-in columns are quantities too (:data:`STANDARD`); ``quantities=``
adds to them, ``quantities=("cheap", ...)`` or a preset name picks a preset.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from gradflow.tracing import stats
from gradflow.tracing.distributed import active, local, share


@dataclass
class Forward:
    """What a quantity sees at a unit's call."""

    x: Tensor
    step: int
    info: Any = None
    module: Any = None
    parts: Any = None
    z: Optional[Tensor] = None
    h: Optional[Tensor] = None
    r: Optional[Tensor] = None
    y: Optional[Tensor] = None
    out: Optional[Tensor] = None
    coef: Any = 1.0
    args: tuple = ()
    is_top: bool = False
    stats: dict = field(default_factory=dict)   # reductions made so far for this row
    vjp: Any = None     # u -> J_l^T u through the unit's own recorded graph (x_l -> x_{l+1}), the tracer's
                        # hooks off; None where that graph gives no dE/dx_l (no grad, or outside a forward)


@dataclass
class Backward:
    """What a quantity sees when dE/dx_l is complete."""

    grad: Tensor
    step: int
    info: Any = None
    stats: dict = field(default_factory=dict)
    direct: Optional[Tensor] = None       # the direct term, scaled by exp(-direct_log_scale)
    direct_log_scale: Any = 0.0
    ref: Optional[Tensor] = None          # the same with every h-coefficient set to 1
    ref_log_scale: Any = 0.0
    direct_norm: Optional[Tensor] = None  # ||direct|| per sample when already known
    residual: Any = None                  # residual() -> grad - direct, in a scratch buffer (recomputed per call)


@dataclass
class Weights:
    """What a quantity sees once per step for a unit's parameters."""

    params: list
    step: int
    info: Any = None
    before: Optional[list] = None         # the weights before the update, when an optimizer is traced


@dataclass
class Derive:
    """Host-side context of :meth:`Quantity.derive`: per-row element counts and ||dE/dx_L||."""

    numel: np.ndarray
    top: Optional[np.ndarray]
    cancel_tol: float


class Quantity:
    """One measured quantity: what it reduces (columns), on which tensor, and when."""

    columns: tuple = ()       # per-sample columns shown in the tables
    scalars: tuple = ()       # one-number-per-row columns
    needs: str = "forward"    # "forward", "grad", "split", "weights" or "update"
    top: bool = False         # also computed on x_L, the head's input
    early: bool = False       # forward reads only t.x and t.step: computed as the unit is
                              # entered, while x_l is still in cache (not after its branch ran)
    summed: tuple = ()        # one-number reductions that are partial norms over parameter shards:
                              # joined across ranks as sqrt(sum of squares); the others are rank 0's

    def should_compute(self, step: int) -> bool:
        return True

    def before(self, t: Forward) -> dict:
        return {}

    def forward(self, t: Forward) -> dict:
        return {}

    def backward(self, t: Backward) -> dict:
        return {}

    def weights(self, t: Weights) -> dict:
        return {}

    def weights_all(self, ts: list) -> list:
        """``weights`` for every unit at once (override to batch): one dict per ``Weights``."""
        return [self.weights(t) for t in ts]

    def derive(self, q: dict, t: Derive) -> None:
        pass

    def finish(self, sc: dict) -> None:
        """On the host, the ranks' values joined: one-number columns from raw ones (name -> [rows])."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Signal(Quantity):
    """x_l: ``x_norm``, ``x_rms``, ``x_mean`` (and ``x_var`` in the tables)."""

    columns = ("x_norm", "x_rms", "x_mean")
    top = True
    early = True

    def forward(self, t: Forward) -> dict:
        return {"x_norm": stats.norm(t.x), "x_mean": stats.mean(t.x)}

    def derive(self, q: dict, t: Derive) -> None:
        if "x_norm" in q:
            q["x_rms"] = q["x_norm"] / np.sqrt(t.numel)[:, None]


class Branches(Quantity):
    """``h_norm``, ``r_norm``: the shortcut's and the branch's outputs; ``coef``: h's coefficient."""

    columns = ("h_norm", "r_norm", "coef")

    def forward(self, t: Forward) -> dict:
        if t.h is None:
            return {}
        x, h = t.x, t.h
        same = h.data_ptr() == x.data_ptr() and h.shape == x.shape and "x_norm" in t.stats
        out = {"h_norm": t.stats["x_norm"] if same else stats.norm(h), "r_norm": stats.norm(t.r)}
        if isinstance(t.coef, Tensor):
            out["coef"] = stats.mean(t.coef)
        return out


class Gradient(Quantity):
    """dE/dx_l: ``grad_norm`` and ``grad_ratio`` = ||dE/dx_l|| / ||dE/dx_L||."""

    columns = ("grad_norm", "grad_ratio")
    needs = "grad"

    def backward(self, t: Backward) -> dict:
        return {"grad_norm": stats.norm(t.grad)}

    def derive(self, q: dict, t: Derive) -> None:
        if t.top is not None and "grad_norm" in q:
            q["grad_ratio"] = q["grad_norm"] / t.top


class Split(Quantity):
    """The direct/residual split of dE/dx_l (eq. 5 and 8), from the carried direct term."""

    columns = ("direct_norm", "direct_ratio", "ref_ratio", "residual_norm", "cos_direct_residual",
               "cancel")
    needs = "split"

    def backward(self, t: Backward) -> dict:
        if t.direct is None:
            return {}
        d = t.direct
        s = {"direct_norm": t.direct_norm if t.direct_norm is not None else stats.norm(d),
             "direct_log_scale": _expand(t.direct_log_scale, t.grad)}
        res = t.residual()   # a scratch buffer: the dot below overwrites it (no temporary)
        s["residual_norm"] = stats.norm(res)
        s["dot_direct_residual"] = stats.dot_into(res, d)   # times exp(direct_log_scale)
        s["ref_norm"] = s["direct_norm"] if t.ref is d else stats.norm(t.ref)
        s["ref_log_scale"] = _expand(t.ref_log_scale, t.grad)
        return s

    def derive(self, q: dict, t: Derive) -> None:
        if "direct_norm" not in q:
            for k in ("ref_norm", "dot_direct_residual", "direct_log_scale", "ref_log_scale"):
                q.pop(k, None)
            return
        n, B = q["direct_norm"].shape
        nan = np.full((n, B), np.nan)
        # the direct and reference vectors are carried scaled by exp(-log_scale)
        scale = np.exp(q.pop("direct_log_scale", np.zeros((n, B))))
        q["direct_norm"] = q["direct_norm"] * scale
        if "dot_direct_residual" in q:
            q["dot_direct_residual"] = q["dot_direct_residual"] * scale
        if "ref_norm" in q:
            q["ref_norm"] = q["ref_norm"] * np.exp(q.pop("ref_log_scale", np.zeros((n, B))))
        g, d, r = q.get("grad_norm", nan), q["direct_norm"], q.get("residual_norm", nan)
        if t.top is not None:
            q["direct_ratio"] = d / t.top
            q["ref_ratio"] = q.get("ref_norm", nan) / t.top
        with np.errstate(divide="ignore", invalid="ignore"):
            q["cos_direct_residual"] = np.clip(q.get("dot_direct_residual", nan) / (d * r), -1.0, 1.0)
        q["cancel"] = np.where(np.isnan(d) | np.isnan(g), np.nan, (g < t.cancel_tol * d).astype(float))
        q.pop("ref_norm", None)
        q.pop("dot_direct_residual", None)


class WeightGradNorm(Quantity):
    """``weight_grad_norm``: ||dE/dW|| over the unit's parameters, as the optimizer sees it."""

    scalars = ("weight_grad_norm",)
    summed = ("weight_grad_norm",)
    needs = "weights"

    def weights(self, t: Weights) -> dict:
        return self.weights_all([t])[0]

    def weights_all(self, ts: list) -> list:
        grads = [[p.grad for p in t.params if p.grad is not None] for t in ts]
        norms = _group_norms(grads).unbind(0)      # a sharded gradient is a DTensor as its parameter
        return [{"weight_grad_norm": n} if g else {} for n, g in zip(norms, grads)]


class UpdateRatio(Quantity):
    """``update_ratio``: ||W_after - W_before|| / ||W_before|| over the unit's parameters.

    Needs ``trace(model, optimizer=opt)``: measured around each recorded ``opt.step()``.
    """

    scalars = ("update_ratio",)
    summed = ("update_ratio", "update_ratio_base")   # ||W_after - W_before|| and ||W_before||, joined
    needs = "update"

    def weights(self, t: Weights) -> dict:
        return self.weights_all([t])[0]

    def weights_all(self, ts: list) -> list:
        use = [t for t in ts if t.before is not None and t.params]
        if not use:
            return [{} for _ in ts]
        with torch.no_grad():   # on each rank's own part of a sharded (DTensor) parameter
            diffs = iter(torch._foreach_sub([local(p) for t in use for p in t.params],
                                            [local(b) for t in use for b in t.before]))
        d = _group_norms([[next(diffs) for _ in t.params] for t in use],
                         [[p for p in t.params] for t in use]).unbind(0)
        w = _group_norms([list(t.before) for t in use]).unbind(0)
        it = iter(zip(d, w))
        return [dict(zip(self.summed, next(it))) if t.before is not None and t.params else {} for t in ts]

    def finish(self, sc: dict) -> None:
        if "update_ratio" in sc:
            base = sc.pop("update_ratio_base", None)
            if base is not None:
                with np.errstate(invalid="ignore"):
                    sc["update_ratio"] = sc["update_ratio"] / np.maximum(base, 1e-30)


class Spectra(Quantity):
    """``sigma_unit``, ``sigma_branch``, ``dist_identity``: Jacobian spectra by power iteration.

    Dear: ``iters`` x (jvp + vjp) per unit and recorded step. Units run with
    extra call arguments or found in a graph (no callable parts) get NaN.
    """

    scalars = ("sigma_unit", "sigma_branch", "dist_identity")

    def __init__(self, iters: int = 20):
        self.iters = iters

    def before(self, t: Forward) -> dict:
        if t.parts is None or t.is_top or t.args:
            return {}
        from gradflow.tracing.spectra import unit_spectra
        vals = unit_spectra(t.module, t.parts, t.x, self.iters)
        return {k: torch.tensor(v) for k, v in vals.items()}

    def __repr__(self) -> str:
        return f"Spectra(iters={self.iters})"


def _group_norms(groups: list, owners: Optional[list] = None) -> Tensor:
    """The L2 norm over each group of tensors ([groups], 0 for an empty one), in one batched reduction.

    Under a process group, over this rank's share (:func:`.distributed.share`) of each tensor: the rank's
    part of a sharded ``DTensor``, a replicated tensor on rank 0 only; the ranks' partial
    norms are then joined as sqrt(sum of squares). ``owners``: the tensors whose placement
    decides the share, where ``groups`` holds plain tensors computed from them (local already).
    """
    if active():
        groups = [[s for t, o in zip(g, og) for s in share(t, o)]
                  for g, og in zip(groups, owners if owners is not None else groups)]
    flat = [t for g in groups for t in g]
    if not flat:
        return torch.zeros(len(groups))
    with torch.no_grad():
        norms = torch._foreach_norm(flat)
        dev = norms[0].device
        try:
            stacked = torch.stack(norms)        # mixed dtypes are promoted
        except RuntimeError:                    # parameters on several devices
            stacked = torch.stack([n.to(dev, torch.float32) for n in norms])
        acc = torch.float32 if dev.type == "mps" else torch.float64   # sums of squares of large norms
        sq = stacked.to(acc).square()
        return torch.zeros(len(groups), device=dev, dtype=acc).index_add_(0, _owner(groups, dev), sq).sqrt().float()


_OWNERS: dict = {}


def _owner(groups: list, dev) -> Tensor:
    """Group index of each tensor of ``groups`` flattened (cached: the same units every step)."""
    key = (tuple(len(g) for g in groups), str(dev))
    t = _OWNERS.get(key)
    if t is None:
        if len(_OWNERS) > 64:
            _OWNERS.clear()
        t = _OWNERS[key] = torch.tensor([i for i, g in enumerate(groups) for _ in g], device=dev)
    return t


def _expand(ls, like: Tensor) -> Tensor:
    if isinstance(ls, Tensor):
        return ls.expand(like.shape[0])
    if ls == 0.0:   # the usual case: one read-only zeros tensor per batch size and device
        key = (like.shape[0], like.device)
        z = _ZEROS.get(key)
        if z is None:
            z = _ZEROS[key] = torch.zeros(like.shape[0], device=like.device)
        return z
    return torch.full((like.shape[0],), float(ls), device=like.device)


_ZEROS: dict = {}


STANDARD = (Signal(), Branches(), Gradient(), Split(), WeightGradNorm(), UpdateRatio())
PRESETS = {
    "cheap": (Signal(), Gradient()),
    "standard": STANDARD,
    "full": STANDARD + (Spectra(),),
}


def resolve(quantities: Optional[Sequence]) -> list:
    """The tracer's quantity list: the standard set plus ``quantities``, or a named preset.

    Args:
        quantities: None (the standard set), Quantity objects to add to it, or a
            sequence starting with a preset name (``"cheap"``, ``"standard"``,
            ``"full"``) followed by extra Quantity objects.
    Returns:
        The quantities, built-ins first, in column order.
    """
    from gradflow.errors import GradflowError
    items = list(quantities or ())
    base = list(STANDARD)
    if items and isinstance(items[0], str):
        name = items.pop(0)
        if name not in PRESETS:
            raise GradflowError(f"quantities preset {name!r}: choose one of {sorted(PRESETS)}")
        base = list(PRESETS[name])
    for q in items:
        if not isinstance(q, Quantity):
            raise GradflowError(f"quantities=[... {q!r} ...]: give gradflow.tracing.Quantity objects "
                                "(subclass it: columns, forward/backward/weights) or a preset name first")
    out = base + items
    names = [c for q in out for c in q.columns + q.scalars]
    dup = {c for c in names if names.count(c) > 1}
    if dup:
        raise GradflowError(f"two quantities write the column(s) {sorted(dup)}: rename one")
    return out
