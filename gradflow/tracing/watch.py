"""The tracer's hook-up of units found at run time (:mod:`.runtime`).

The first traced forward of a model with no unit known by class or declared
runs once more, first, as a discovery forward: on copies of its arguments,
with gradients on, its buffers and the random stream restored afterwards, so
the forward that is recorded is the one the user ran (:mod:`.check` gives the
copies). What discovery found becomes the tracer's units; the sites where
they show (an addition, counted within the call of the module it happens in)
are watched on every recorded forward by a :class:`~torch.overrides.TorchFunctionMode`
that passes every other operation straight through, and forward hooks on the
modules the units happen in. At each unit's addition the tracer gets x_l (the
shortcut operand, or the module's input for a projection unit), h, the branch
r and the sum, as for any other unit, and hooks dE/dx_l on x_l itself.

The direct/residual split needs nothing more: the direct term is carried back
through the graph of the forward that ran, as vector-Jacobian products
through the shortcut's own operations (a projection) and through whatever runs
between one unit's sum and the next unit's x_l (a post-LN LayerNorm, a ReLU
after the addition); no module is re-run.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from gradflow.errors import GradflowError
from gradflow.tracing.check import _copy_arg
from gradflow.utils.state import untouched
from gradflow.tracing.runtime import ADDS, INPLACE, Discovery, Found, counted, depth_units, name_found, site


def discover(model: nn.Module, args: tuple, kwargs: dict) -> Discovery:
    """Run ``model`` once on copies of ``args``/``kwargs`` under :class:`Discovery`, leaving no trace.

    Gradients are on (the graph is what tells a residual addition), floating
    inputs are made leaves that require grad, frozen parameters require grad for
    this forward only (it has no backward), buffers and the RNG are restored.
    """
    if not any(True for _ in model.parameters()):
        raise GradflowError(
            f"{type(model).__name__} has no parameters: units are found at run time as additions whose "
            "branch is learned (parameters between x_l and the sum). Declare its units "
            "(trace(model, units='blocks.*', parts={...}))")
    _say_hooks(model)
    leaves, _ = tree_flatten((args, kwargs))
    device = next((t.device for t in leaves if isinstance(t, Tensor)), torch.device("cpu"))
    a, k = tree_map(_copy_arg, (tuple(args), dict(kwargs)))
    a, k = tree_map(_leaf, (a, k))
    # frozen parameters show in this forward's graph too (no backward runs through it)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        d = Discovery(model)
        with untouched(model, device), torch.enable_grad(), d:
            d.run(*a, **k)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    name_found(d.found)
    return d


def _say_hooks(model: nn.Module) -> None:
    """Say once that the discovery forward runs the forward hooks a user put on the model's modules."""
    hooked = [n for n, m in model.named_modules()
              if n and (m._forward_hooks or m._forward_pre_hooks)]
    glob = nn.modules.module
    if glob._global_forward_hooks or glob._global_forward_pre_hooks:
        hooked.insert(0, "(global module hooks)")
    if hooked:
        warnings.warn(
            f"gradflow.trace: units of {type(model).__name__} are found on a discovery forward, run once "
            "before the first traced forward on copies of its arguments; it runs the forward hooks on "
            f"{len(hooked)} module(s) ({', '.join(hooked[:4])}{', ...' if len(hooked) > 4 else ''}), so a "
            "hook that records what it sees sees that forward first. Declare the units "
            "(trace(model, units='blocks.*')) to trace without a discovery forward",
            RuntimeWarning, stacklevel=4)


def _leaf(t: Any) -> Any:
    if isinstance(t, Tensor) and t.is_floating_point() and not t.requires_grad:
        return t.detach().requires_grad_()
    return t


class Watch(TorchFunctionMode):
    """Watches a traced model's forwards for the sites of its run-time units; reports to the tracer."""

    def __init__(self, tracer):
        super().__init__()
        self.tracer = tracer
        self.found: Optional[list] = None       # every Found, once discovered
        self.listed: list = []                  # UnitInfo of every Found (depth units, sub-units, sums)
        self.units: list = []                   # (UnitInfo, Found) of the depth units, in call order
        self.sites: dict = {}                   # (path, call, ordinal) -> [(what, k)]
        self.inputs: dict = {}                  # (path, call) -> [k]: projection units' x_l
        self.owners: dict = {}                  # path -> module
        self._handles: list = []
        self._stack: list = []                  # [path, call, ordinal] of the owner calls running
        self._calls: dict = {}
        self._pending: dict = {}                # k -> x_l taken at its unit's entry
        self._entered = False
        self.no_split = ""                      # why the split is not made, if it is not

    # -- attach ------------------------------------------------------------------------

    def attach(self) -> None:
        model = self.tracer.model
        self._handles.append(model.register_forward_pre_hook(self._on_model, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._on_model_end, always_call=True))
        if self.found is not None:
            self.tracer._add_run_units([i for i, _ in self.units])
            self._hook_owners()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._entered:
            self._entered = False
            self.__exit__(None, None, None)
        self._stack.clear()

    def _hook_owners(self) -> None:
        for path, m in self.owners.items():
            if path:
                self._handles.append(m.register_forward_pre_hook(self._pre(path, m)))
                self._handles.append(m.register_forward_hook(self._post, always_call=True))

    # -- discovery (the first forward) ---------------------------------------------------

    def _discover(self, args: tuple, kwargs: dict) -> None:
        from gradflow.tracing.discover import UnitInfo, assign_stages
        tr, model = self.tracer, self.tracer.model
        d = discover(model, args, kwargs)
        self.found = d.found
        infos, by_found = [], {}
        modules = dict(model.named_modules())
        for f in d.found:
            path = f.exit.path
            role = "depth" if f.parent is None and f.kind != "sum" else (
                "sub-unit" if f.parent is not None else "sum")
            m = modules.get(path, model)
            info = UnitInfo(f.name, m, _kind(m, f), None, None, 1.0 if f.kind != "projection" else None,
                            "run", owned=tuple(f.params), module_name=f.name, role=role,
                            note=f.note or ("" if role == "depth" else _why_not(f)), site=site(f))
            by_found[id(f)] = info
            infos.append(info)
        self.listed = infos
        depth = depth_units(d.found)
        if not depth:
            sums = [i.name for i in infos]
            raise GradflowError(
                f"no residual unit found in {type(model).__name__}: of its {len(d.events)} tensor additions, none "
                "adds a learned branch to an identity or projection shortcut"
                + (f" (parallel branch sums, with no identity operand: {sums[:6]})" if sums else "")
                + ". Declare its units: trace(model, units='blocks.*', parts={...})")
        folded = [f for f in depth if _batch(f) != d.batch and d.batch is not None]
        for f in folded:    # MobileViT folds patches into the batch: rows are per sample
            by_found[id(f)].role = "folded"
            by_found[id(f)].note = (f"not recorded: its input's first dimension ({_batch(f)}) is not the "
                                    f"batch ({d.batch}); the block folds the batch, so per-sample rows "
                                    "cannot be made")
        if folded:
            warnings.warn(f"gradflow.trace: {len(folded)} residual units of {type(model).__name__} are not "
                          f"recorded ({[by_found[id(f)].name for f in folded][:4]}...): "
                          + by_found[id(folded[0])].note, RuntimeWarning, stacklevel=3)
        depth = [f for f in depth if f not in folded]
        units = [by_found[id(f)] for f in depth]
        assign_stages(units)
        k = _chain_break(depth)
        self.no_split = ""
        if k is not None:
            self.no_split = (f"no split: the direct term of eq. (5) is a product along one chain of units, and "
                             f"unit {units[k].name!r} takes its input from the outputs of several earlier units "
                             "(a tree or dual-path network: DLA, DPN)")
            for u in units:
                u.note = self.no_split
            if tr.split:
                warnings.warn(f"gradflow.trace: {type(model).__name__}: {self.no_split}; the split columns "
                              "are not made", RuntimeWarning, stacklevel=3)
        self.units = list(zip(units, depth))
        self._sites(d, depth)
        d.release()
        tr._add_run_units(units)
        self._hook_owners()

    def _sites(self, d: Discovery, depth: list[Found]) -> None:
        """Where each depth unit shows: its additions counted within the call of their owner module."""
        owners = {f.entry.path for f in depth} | {f.exit.path for f in depth}
        modules = dict(self.tracer.model.named_modules())
        self.owners = {p: modules[p] for p in owners if p in modules}
        place: dict = {}
        counts: dict = {}
        for ev in d.events:
            own = next((s for s in reversed(ev.stack) if s[0] in owners), ("", 0))
            n = counts.get(own, 0)
            counts[own] = n + 1
            place[id(ev)] = (own[0], own[1], n)
        for k, f in enumerate(depth):
            if f.fork == "input":
                path, call = f.exit.stack[-1] if f.exit.stack else ("", 0)
                self.inputs.setdefault((path, call), []).append(k)
            else:
                self.sites.setdefault(place[id(f.entry)], []).append(("enter", k))
            self.sites.setdefault(place[id(f.exit)], []).append(("exit", k))

    # -- each recorded forward ------------------------------------------------------------

    def _on_model(self, module, args, kwargs):
        if self.found is None:
            self._discover(args, kwargs)
        self._calls.clear()
        self._pending.clear()
        self._stack[:] = [["", 0, 0]]
        self._take_inputs("", 0, args)
        if not self._entered:
            self._entered = True
            self.__enter__()
        if torch.is_grad_enabled() and self.tracer._clock.recording:
            return tree_map(_leaf, (tuple(args), dict(kwargs)))
        return None

    def _on_model_end(self, module, args, out):
        if self._entered:
            self._entered = False
            self.__exit__(None, None, None)
        self._stack.clear()

    def _pre(self, path: str, module: nn.Module):
        def hook(m, args):
            if not self._entered:
                return
            c = self._calls.get(path, 0)
            self._calls[path] = c + 1
            self._stack.append([path, c, 0])
            self._take_inputs(path, c, args)
        return hook

    def _post(self, module, args, out):
        if self._entered and len(self._stack) > 1:
            self._stack.pop()

    def _take_inputs(self, path: str, call: int, args) -> None:
        ks = self.inputs.get((path, call))
        if ks and args and isinstance(args[0], Tensor):
            for k in ks:
                self._pending[k] = args[0]
                if self._live():
                    self.tracer._enter(args[0])

    def _live(self) -> bool:
        tr = self.tracer
        return tr._clock.recording and tr._clock.micro is not None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in ADDS or not self._stack or not counted(args, kwargs):
            return func(*args, **kwargs)
        top = self._stack[-1]
        acts = self.sites.get((top[0], top[1], top[2]))
        top[2] += 1
        if acts is None:
            return func(*args, **kwargs)
        live = self._live()
        saved = None
        for what, k in acts:
            if what == "enter":
                x = args[self.units[k][1].entry_shortcut]
                self._pending[k] = x
                if live:
                    self.tracer._enter(x)
        if live and func in INPLACE:
            saved = args[0].detach().clone()     # the operand the addition overwrites, as it was
        out = func(*args, **kwargs)
        if live:
            for what, k in acts:
                if what == "exit":
                    self._exit(k, args, out, saved)
        return out

    def _exit(self, k: int, args, out: Tensor, saved: Optional[Tensor]) -> None:
        info, f = self.units[k]
        x = self._pending.pop(k, None)
        if x is None:
            return
        s = f.shortcut
        h, r = args[s], args[1 - s]
        h_val = saved if saved is not None and s == 0 else h
        r_val = saved if saved is not None and s == 1 else r
        x_val = h_val if x is h else x
        if f.kind == "parallel":
            r_val = out.detach() - x_val.detach()
            h = x
        tr = self.tracer
        group = tr._run_groups[id(info)]
        call = tr._new_call(info, group, None, ())
        tr._take_entry(call, x)
        tr._tap(call, x=x_val, z=x_val, shortcut_in=x_val, h=h if f.fork == "input" else x, r=r_val, y=out,
                coef=1.0, out=out)
        call.identity_shortcut = f.fork != "input"
        if self.no_split:
            call.h_edge = None      # the carry stops at every unit (see _chain_break)
        tr._after_unit(call, x, out)


def _chain_break(depth: list, budget: int = 20000) -> Optional[int]:
    """The first depth unit whose input is computed from an earlier unit's output other than the
    previous one's, without going through the previous one (None: the units form one chain)."""
    from gradflow.tracing.runtime import _seq
    if len(depth) < 3:
        return None
    floor = _seq(depth[0].exit.ny)
    for k in range(2, len(depth)):
        block, earlier = depth[k - 1].exit.ny, {depth[j].exit.ny for j in range(k - 1)}
        seen, todo = set(), [depth[k].x_node]
        while todo and len(seen) < budget:
            n = todo.pop()
            if n is None or n is block or n in seen:
                continue
            if n in earlier:
                return k
            seen.add(n)
            if type(n).__name__ != "AccumulateGrad" and _seq(n) >= floor:
                todo.extend(c for c, _ in n.next_functions if c is not None)
    return None


def _batch(f: Found):
    x = f.entry.b if f.entry_shortcut else f.entry.a
    return x.shape[0] if x.dim() else None


def _kind(m: nn.Module, f: Found) -> str:
    return f"{type(m).__module__}.{type(m).__name__}"


def _why_not(f: Found) -> str:
    if f.parent is not None:
        return f.note
    return "a parallel branch sum with no identity operand: not on the depth path"
