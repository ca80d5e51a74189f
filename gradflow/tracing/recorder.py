"""The tracer: records per-unit activations and dE/dx_l, and splits dE/dx_l.

Usage::

    with gradflow.trace(model, optimizer=opt) as tr:   # hooks attached here, removed on exit
        for x, y in batches:
            loss = criterion(model(x), y)
            loss.backward()
            opt.step(); opt.zero_grad()
    tr.units                              # one row per unit per micro-batch per recorded step

How it works, and its sharp edges
---------------------------------
* Steps: with ``optimizer=``, a step is one ``optimizer.step()`` and every
  forward of the model inside it is a micro-batch (``micro`` column); without,
  a step is one forward call of the model. Any order of forwards and backwards
  PyTorch allows is recorded: accumulation over micro-batches, several
  backward passes through a retained graph (each its own rows, ``backward``
  column, exact for its own loss), tables read at any time (rows appear once
  their backward has arrived; reading never closes a step), forwards under
  ``no_grad`` (``phase="eval"`` rows, activations only), AMP with a
  ``GradScaler`` (pass ``scaler=``: gradients are unscaled, and a step whose
  update the scaler skipped is marked ``skipped``). What cannot be recorded
  (a backward that never came, one that reached only some units, one that came
  after its rows were written) is said once, as a warning, and left NaN.
* Each unit's module runs, for the duration of the ``with`` block, from its
  parts (:mod:`gradflow.tracing.parts`: ``Block.forward(run, *args, **kwargs)``), with
  the call's extra arguments passed to the branches; on its first call the
  result is checked against the module's own forward (:mod:`.check`). Units
  known only by input and output run their own forward. Everything is
  restored on exit, exceptions included. Nested traces of the same modules are
  refused.
* Gradients are captured with ``Tensor.register_hook`` on each unit's input,
  not with module backward hooks, so in-place operations inside a block, units
  whose input does not require grad and modules called more than once are fine.
  The hook, the graph edge and the x-only (``early``) reductions are taken as
  the unit (or its block) is entered: a unit that overwrites its input in place
  is measured at the x_l it was given, not at what it left in its place.
* Activation checkpointing re-runs units inside the backward pass: the re-run
  records nothing new (the forward call's rows stand). ``use_reentrant=False``
  is recorded exactly; ``use_reentrant=True`` runs the forward under
  ``no_grad``, so the checkpointed units' gradient columns are NaN, said once.
* The direct term of eq. (5)/(8) is dE/dx_L carried back through the shortcut
  side only. It is computed during the backward pass: when dE/dx_{l+1} is
  complete, unit l's part of the graph has not run yet, and a small re-entrant
  ``autograd.grad`` through its after-addition activation and shortcut, at
  the recorded forward (same BN batch statistics, same dropout masks, no
  running-statistic update, no random numbers drawn), gives direct_l. The
  residual term is total - direct.
* What is measured is a list of :mod:`.quantities` (plug-ins); per-sample
  reductions are computed on the device inside the hooks and moved to the host
  once per step. No activation or gradient outlives the step unless ``keep=``
  asks for it. ``sinks=`` stream each step's rows as they are made
  (:mod:`.sinks`); ``history=`` bounds what stays in memory.
* ``torch.compile``d models are refused with a message: trace the original module.
"""
from __future__ import annotations

import types
import warnings
from collections import deque
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

from gradflow.errors import GradflowError
from gradflow.tracing.parts import Runner, forward_runs_parts, run_parts
from gradflow.tracing import stats
from gradflow.tracing.check import Uncopyable, compare, describe, reference_output
from gradflow.tracing.discover import PartsSpec, UnitInfo, UnitsSpec, plan_units
from gradflow.tracing.quantities import Backward, Forward, Quantity, resolve
from gradflow.tracing.paths.carrier import PathTracker
from gradflow.tracing.schedule import as_schedule
from gradflow.tracing.carry import DirectCarrier, _exp
from gradflow.tracing.records import Call, Micro, _Entry
from gradflow.tracing.clock import StepClock
from gradflow.tracing.weightstats import WeightStats
from gradflow.tracing.writer import TableWriter
from gradflow.tracing.distributed import ranks_for

_ACTIVE: dict = {}      # id(module) -> the tracer that patched it (nested traces are refused)
_MAX_PENDING = 16       # micro-batches waiting for a backward before they are written as they are


class _Group:
    """One patched module: its units (in block order), its block, and whether it was checked."""

    def __init__(self, module: nn.Module, infos: list):
        self.module, self.infos = module, infos
        self.build()

    def build(self) -> None:
        """The block and parameters of the module as it is now (again when a child was replaced)."""
        info = self.infos[0]
        self.block = info.parts() if info.parts is not None else None
        self.children = _children(self.module)
        # a zoo unit's forward is run_parts(parts()): checking one against the other is a tautology
        self.checked = info.found == "zoo" and forward_runs_parts(self.module)
        # per unit, its parameters; units of several-unit blocks without declared modules learn
        # theirs from the Parts they run with, on their first call
        self.params = [_params(i.owned) if i.owned else None for i in self.infos]


def _children(module: nn.Module) -> tuple:
    return tuple(map(id, module._modules.values()))


def _params(owned) -> list:
    out, seen = [], set()
    for o in owned:
        ps = [o] if isinstance(o, nn.Parameter) else list(o.parameters())
        for p in ps:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


class Tracer(TableWriter, DirectCarrier):
    """Attach with ``with Tracer(model) as tr`` (or :func:`trace`); read ``tr.units``.

    Args:
        model: the network.
        units: which modules are residual units (a name pattern, a list of modules);
            see :func:`gradflow.tracing.find_units`. By default they are found.
        parts: what the declared units' parts are (submodule names, callables, or a
            function of the module); by default they are found.
        split: compute the direct/residual split of dE/dx_l (eq. 5 and 8).
        schedule: which steps to record: None (every step), an int n (every
            n-th), or a schedule such as ``gradflow.tracing.log_spaced()``.
        keep: full tensors to keep per unit and step, moved to the CPU: any of
            ``"x"``, ``"grad"``, ``"direct"``; keyed ``(step, unit)`` for the
            first micro-batch's first backward, ``(step, unit, micro, backward)``
            for the others. Off by default: they cost memory.
        cancel_tol: a sample counts as "residual cancels direct" when
            ||dE/dx_l|| < cancel_tol * ||direct_l||.
        optimizer: a step is then one ``optimizer.step()``; adds the update size.
        scaler: the ``torch.amp.GradScaler`` scaling the loss, if any.
        quantities: extra :class:`~gradflow.tracing.Quantity` objects, or a
            preset name first (``"cheap"``, ``"standard"``, ``"full"``).
        sinks: objects with ``write(units, samples)`` (and ``open``/``close``)
            receiving each step's rows as they are made.
        history: how many recorded steps to keep in memory (None: all).
        check: compare each unit's parts with its own forward on the first call.
        paths: the exact split of dE/dx_l by path length (True: every length k;
            an int: lengths 0..paths apart, longer ones summed as k = -1), read
            as ``tr.paths``; ``keep=("paths",)`` keeps the components
            [K+1, *x_l.shape] (see :mod:`gradflow.tracing.paths.carrier`).
    """

    def __init__(self, model: nn.Module, units: UnitsSpec = None, parts: PartsSpec = None,
                 split: bool = True, schedule=None, keep: Sequence[str] = (),
                 cancel_tol: float = 0.1,
                 optimizer: Optional[torch.optim.Optimizer] = None, scaler: Any = None,
                 quantities: Optional[Sequence] = None, sinks: Sequence = (),
                 history: Optional[int] = None, check: bool = True, paths: Union[bool, int, None] = None,
                 gather: bool = True):
        bad = set(keep) - {"x", "grad", "direct", "paths"}
        if bad:
            raise GradflowError(f"keep={sorted(bad)!r}: choose from 'x', 'grad', 'direct', 'paths'")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise GradflowError(f"optimizer={type(optimizer).__name__}: give a torch.optim.Optimizer "
                                "(the one whose step() ends a training step)")
        if history is not None and history < 0:
            raise GradflowError(f"history={history!r}: give None (keep every step) or a count >= 0")
        self.model = model
        _refuse_nested(model)
        self.infos, runtime = plan_units(model, units, parts)
        self._watch = None          # units found as the model runs (on its first forward)
        self._active: list = []     # the modules this tracer records (another trace of them is refused)
        self._run_groups: dict = {}
        if runtime:
            from gradflow.tracing.watch import Watch
            self._watch = Watch(self)
        self.split = split
        self._paths = None if paths is None or paths is False else PathTracker(None if paths is True else paths)
        if self._paths is not None and not split:
            raise GradflowError("paths= needs split=True: the path-length split refines the direct/residual one")
        self.schedule = as_schedule(schedule)
        self.keep = tuple(keep)
        self.cancel_tol = cancel_tol
        self.optimizer, self.scaler = optimizer, scaler
        self.quantities = resolve(quantities)
        self._q_fwd = [q for q in self.quantities if q.needs == "forward"]
        self._q_before = [q for q in self._q_fwd if type(q).before is not Quantity.before]
        self._q_early = [q for q in self._q_fwd if q.early]
        self._q_bwd = [q for q in self.quantities if q.needs in ("grad", "split")]
        self._weights = WeightStats(self.quantities, optimizer is not None)
        self._columns = tuple(c for q in self.quantities for c in q.columns)
        self._scalar_cols = tuple(c for q in self.quantities for c in q.scalars)
        self.sinks = list(sinks)
        self.history = history
        self.check = check
        self.gather = gather
        self._ranks = None          # under a process group: joins the ranks' rows (set at attach)
        self.tensors: dict = {}     # keep= tensors
        self._frames: deque = deque()   # (step, units, samples) of written steps
        self._clock = StepClock(self.schedule, _MAX_PENDING)   # steps and micro-batches
        self._busy = False          # inside our own re-entrant autograd.grad
        self._in_bw, self._bw_id, self._touched = False, 0, []
        self._handles: list = []
        self._buffers: dict = {}    # scratch tensors for the residual term, per shape
        self._patched: list = []
        self._groups: list[_Group] = []
        self._warned: set = set()
        self._stages_done = False
        self._attached = False
        self._in_model = 0          # depth of the traced model's forward calls running now

    # -- attach / detach -------------------------------------------------------------

    def __enter__(self) -> "Tracer":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self._raised = exc[0].__name__ if exc[0] is not None else None   # named by the NaN-rows warning
        self.detach()

    @property
    def attached(self) -> bool:
        """Whether the hooks are on and the units' modules patched (between attach and detach)."""
        return self._attached

    def attach(self) -> "Tracer":
        """Attach the hooks and patch the units' modules (``with`` does this).

        Returns:
            The tracer itself, so ``tr = Tracer(model).attach()`` works outside ``with``.
        """
        if self._attached:
            return self
        _refuse_nested(self.model)
        self._ranks = ranks_for(self)   # under a process group; refuses what cannot run there
        opened = []
        try:
            self._attach(opened)
        except BaseException:
            # a hook, a patch or a sink's open() failed partway: leave the model as it was
            self._unpatch()
            for s in reversed(opened):
                if hasattr(s, "close"):
                    try:
                        s.close()
                    except Exception:  # noqa: BLE001  (the first error is the one to see)
                        pass
            raise
        self._attached = True
        return self

    def _attach(self, opened: list) -> None:
        # units found at run time may lie anywhere in the model: all of it is recorded
        self._active = list(self.model.modules()) if self._watch is not None else \
            [self.model] + [i.module for i in self.infos]
        for m in self._active:
            _ACTIVE[id(m)] = self
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_forward))
        self._handles.append(self.model.register_forward_hook(self._on_model_forward_end, always_call=True))
        self._in_model = 0
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_opt_pre))
            self._handles.append(self.optimizer.register_step_post_hook(self._on_opt_post))
            self._begin_step(0)
        if self.scaler is not None:
            self._patch_scaler()
        # built at each attach: a module changed between two attaches runs (and is checked) as it is now
        self._groups = []
        by_module: dict = {}
        for info in self.infos:
            if info.found != "run":
                by_module.setdefault(id(info.module), []).append(info)
        for infos in by_module.values():
            group = _Group(infos[0].module, sorted(infos, key=lambda i: i.slot))
            self._groups.append(group)
            self._patch(group)
        if self._watch is not None:
            self._watch.attach()
        for s in self.sinks:
            if hasattr(s, "open"):
                s.open(self)
            opened.append(s)

    def detach(self) -> None:
        """Remove every hook and restore every patched forward; write the pending steps."""
        self._unpatch()
        was = self._attached
        self._attached = False
        self._write([m for m in self._clock.open], final=True)
        self._clock.micro = None
        if was:
            for s in self.sinks:
                if hasattr(s, "close"):
                    s.close()

    def _unpatch(self) -> None:
        """Remove the hooks, restore the patched attributes, release the modules."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._watch is not None:
            self._watch.detach()
        for obj, name, had, old in reversed(self._patched):
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)
        self._patched.clear()
        for m in self._active:
            if _ACTIVE.get(id(m)) is self:
                del _ACTIVE[id(m)]

    def _save_attr(self, obj, name: str) -> None:
        had = name in obj.__dict__
        self._patched.append((obj, name, had, obj.__dict__.get(name)))

    def _patch(self, group: _Group) -> None:
        module = group.module
        original = module.forward
        self._save_attr(module, "forward")
        tracer = self

        def forward(self_module, *args, **kwargs):
            if _in_backward():          # activation checkpointing re-running the unit
                tracer._recomputed(group)
                return original(*args, **kwargs)
            if tracer._clock.micro is None:   # a unit called before any forward of the model itself
                tracer._open_micro()
            if not tracer._clock.recording:
                return original(*args, **kwargs)
            return tracer._run_module(group, original, args, kwargs)

        module.forward = types.MethodType(forward, module)

    def _add_run_units(self, infos: list) -> None:
        """Units found as the model ran: they are watched, not patched; groups hold their parameters."""
        self.infos = list(infos)
        self._run_groups = {}
        for info in infos:
            group = _Group(info.module, [info])
            self._groups.append(group)
            self._run_groups[id(info)] = group

    def _recomputed(self, group: _Group) -> None:
        """A unit re-run inside a backward pass: activation checkpointing recomputing its forward.

        Its rows are those of the forward call; the re-run adds none. With
        ``use_reentrant=False`` the forward ran with gradients and is fully
        recorded. With ``use_reentrant=True`` it ran under ``no_grad``: no hook
        could be placed, so its gradient columns are NaN, said here once.
        """
        if "reentrant" in self._warned:
            return
        ids = {id(i) for i in group.infos}
        if any(not c.expects_grad and id(c.info) in ids and m.phase == "train"
               for m in self._clock.open for c in m.calls):
            self._warn("reentrant", f"unit {group.infos[0].name!r} ran its forward under no_grad and again "
                       "inside the backward pass (activation checkpointing with use_reentrant=True): "
                       "dE/dx_l and the split of checkpointed units (and dE/dx_L after a checkpointed last unit) "
                       "cannot be recorded and are NaN. "
                       "Checkpoint with use_reentrant=False (torch.utils.checkpoint.checkpoint(..., "
                       "use_reentrant=False); Hugging Face: gradient_checkpointing_enable("
                       "gradient_checkpointing_kwargs={'use_reentrant': False}))")

    def _patch_scaler(self) -> None:
        scaler, original = self.scaler, self.scaler.update
        self._save_attr(scaler, "update")

        def update(*args, **kwargs):
            out = original(*args, **kwargs)
            self._close_step(skipped=not self._weights.updated)
            return out
        scaler.update = update

    # -- steps --------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """The index of the current step (-1 before the first)."""
        return self._clock.step

    def _begin_step(self, step: int) -> None:
        self._clock.begin(step)
        self._weights.reset()

    def _on_model_forward(self, module, args) -> None:
        self._open_micro()
        self._in_model += 1

    def _on_model_forward_end(self, module, args, output) -> None:
        """dE/dx_L arrives at the last unit's output: hook it once the model's forward is done."""
        self._in_model = max(0, self._in_model - 1)
        m = self._clock.micro
        if not self._in_model and m is not None and m.top_pending is not None:
            self._hook_top(m)

    def new_micro(self) -> None:
        """Open a new micro-batch of the current step (trainer callbacks call this per batch).

        The next forward of the model then joins it instead of opening another,
        so it works whether or not the training code calls the traced module itself.
        """
        self._open_micro()
        self._clock.fresh = self._clock.micro

    def _open_micro(self) -> None:
        m, train = self._clock.micro, torch.is_grad_enabled()
        fresh, self._clock.fresh = self._clock.fresh, None
        if m is not None:
            m.entries.clear()      # inputs of the last forward that no unit claimed
            if m.top_pending is not None:
                self._hook_top(m)
        if m is not None and m is fresh and not m.calls and not m.final \
                and m.phase == ("train" if train else "eval"):
            return   # the micro-batch new_micro() opened, joined by the model's forward
        if self.optimizer is None:
            self._begin_step(self.step + 1)
        elif self.step < 0:
            self._begin_step(0)
        self._write_complete()
        self._clock.new_micro(train)

    def next_step(self) -> None:
        """Close the current step and open the next one.

        Each forward call of the traced model does this (each ``optimizer.step()``
        when an optimizer is traced); call it yourself when you run units or
        submodules directly, which otherwise join the open step.
        """
        if self.optimizer is not None:
            self._close_step()
            self._open_micro()
        else:
            self._open_micro()

    def _write_complete(self) -> None:
        """Write the micro-batches that are complete (and bound how many wait)."""
        ready = self._clock.ready(per_forward=self.optimizer is None)
        if ready:
            self._write(ready, final=True)

    def _close_step(self, skipped: bool = False) -> None:
        """Optimizer mode: the step's update happened (or was skipped); write its rows."""
        mine = self._clock.of_step()
        for m in mine:
            m.skipped = skipped
        if skipped and mine:
            self._warn("skipped", f"step {self.step}: the optimizer's update was skipped (GradScaler "
                       "found inf/NaN gradients); its rows are kept with skipped=True")
        self._write(mine, final=True)
        self._clock.micro = None
        self._begin_step(self.step + 1)

    def _on_opt_pre(self, opt, args, kwargs) -> None:
        if self._clock.recording and any(m.step == self.step for m in self._clock.open):
            self._weights.before_update(self._groups, self.step)

    def _on_opt_post(self, opt, args, kwargs) -> None:
        self._weights.after_update(self._groups, self.step)
        if self.scaler is None:
            self._close_step()

    # -- forward ----------------------------------------------------------------------

    def _run_module(self, group: _Group, original, args: tuple, kwargs: dict):
        if args and isinstance(args[0], Tensor) and torch.is_grad_enabled() and \
                args[0].is_floating_point() and not args[0].requires_grad:
            args = (args[0].detach().requires_grad_(),) + tuple(args[1:])   # e.g. a frozen stem
        x0 = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        self._enter(x0)     # x_l as it enters, before the module can change it in place
        if group.children != _children(group.module):
            group.build()   # a child replaced while attached (a lesion, a swapped branch): run it
        if group.block is None:
            out = original(*args, **kwargs)
            first = _first_tensor(out)
            if isinstance(x0, Tensor) and isinstance(first, Tensor):
                call = self._new_call(group.infos[0], group, None, ())
                self._take_entry(call, x0)
                self._forward_stats(call, Forward(x=x0, step=self.step, info=call.info, module=group.module))
                call.x_shape = _shape(x0)
                self._after_unit(call, x0, first)
            return out
        ref = None
        if self.check and not group.checked:
            try:
                ref = reference_output(original, group.module, args, kwargs)
            except Uncopyable as e:   # never run the check on a live object: say so, once
                group.checked = True
                warnings.warn(f"gradflow: the parts of {group.infos[0].module_name or type(group.module).__name__!r} "
                              f"are not checked against its own forward: an argument cannot be copied "
                              f"({e}), and running the module on the original would change it", stacklevel=2)
        out = group.block.forward(_Run(self, group), *args, **kwargs)
        if ref is not None:
            compare(group.infos[0].module_name or type(group.module).__name__,
                    describe(group.block, group.module), ref, out)
            group.checked = True
        return out

    def _new_call(self, info: UnitInfo, group: _Group, parts, args: tuple) -> Call:
        m = self._clock.micro
        return Call(info, len(m.calls), m, group.module, parts, args)

    def _forward_stats(self, call: Call, t: Forward) -> None:
        t.stats = call.fwd
        early = call.entry is not None
        for q in self._q_fwd:
            if not (early and q.early) and q.should_compute(self.step):
                for k, v in q.forward(t).items():
                    (call.scalars if k in self._scalar_cols else call.fwd)[k] = v

    def _enter(self, x) -> Optional[_Entry]:
        """Take x_l as a unit (or a block of units) is entered: the ``early`` quantities, the
        gradient hook and the graph edge, before the unit can change x in place, and while x
        is still in cache. A unit whose input is this very tensor claims it (``_take_entry``)."""
        m = self._clock.micro
        if not (self._clock.recording and isinstance(x, Tensor)) or m is None:
            return None
        e, version = m.entries.get(id(x)), _version(x)
        if e is not None and e.x is x and e.version == version:
            return e
        e = m.entries[id(x)] = _Entry(x, version)
        if "x" in self.keep:
            e.kept = x.detach().to("cpu", copy=True)
        if self._q_early:
            t = Forward(x=x, step=self.step, stats=e.fwd)
            for q in self._q_early:
                if q.should_compute(self.step):
                    for k, v in q.forward(t).items():
                        (e.scalars if k in self._scalar_cols else e.fwd)[k] = v
        if torch.is_grad_enabled() and x.requires_grad:
            cell = e.cell = [None]
            x.register_hook(lambda g: None if cell[0] is None else self._on_grad(cell[0], g))
            if self.split:
                e.edge = get_gradient_edge(x)
        return e

    def _take_entry(self, call: Call, x: Tensor) -> None:
        """Give ``call`` the entry taken when its input ``x`` came in (if any, and unclaimed)."""
        e = call.micro.entries.pop(id(x), None)
        if e is None or e.x is not x:
            return
        call.entry = e
        call.fwd.update(e.fwd)
        call.scalars.update(e.scalars)

    def _before_unit(self, call: Call, x: Tensor) -> None:
        t = Forward(x=x, step=self.step, info=call.info, module=call.module, parts=call.parts,
                    args=call.args, stats=call.fwd)
        for q in self._q_before:
            if q.should_compute(self.step):
                for k, v in q.before(t).items():
                    (call.scalars if k in self._scalar_cols else call.fwd)[k] = v

    def _tap(self, call: Call, *, x, z, shortcut_in, h, r, y, coef, out) -> None:
        call.x_shape = _shape(x)
        vjp = None
        if torch.is_grad_enabled() and isinstance(x, Tensor) and x.requires_grad and out.requires_grad:
            vjp = lambda u: self._unit_vjp(out, x, u)       # noqa: E731
        self._forward_stats(call, Forward(x=x, step=self.step, info=call.info, module=call.module,
                                          parts=call.parts, z=z, h=h, r=r, y=y, out=out, coef=coef,
                                          args=call.args, vjp=vjp))
        call.coef = coef.detach() if isinstance(coef, Tensor) else float(coef)
        if torch.is_grad_enabled() and self.split and out.requires_grad:
            call.y_edge = get_gradient_edge(y) if y is not out else None
            call.h_edge = get_gradient_edge(h)
            if self._paths is not None:
                self._paths.on_tap(call, x=x, h=h, r=r, y=y, out=out, coef=coef, parts=call.parts)

    def _unit_vjp(self, out: Tensor, x: Tensor, u: Tensor) -> Tensor:
        """J^T u of x -> out through the graph recorded so far; the tracer's own hooks stay quiet."""
        busy, self._busy = self._busy, True
        try:
            (v,) = torch.autograd.grad(out, x, u, retain_graph=True, allow_unused=True)
        finally:
            self._busy = busy
        return torch.zeros_like(x) if v is None else v

    def _after_unit(self, call: Call, x: Tensor, out: Tensor) -> None:
        m = call.micro
        call.out_shape = _shape(out)
        e, call.entry = call.entry, None      # its hook, edge and x are used here or let go
        if "x" in self.keep:
            self._keep(call, "x", e.kept if e is not None and e.kept is not None else x, 0)
        prev_out, m.last_out = m.last_out, out
        m.calls.append(call)
        if not (torch.is_grad_enabled() and isinstance(out, Tensor) and out.requires_grad
                and x.requires_grad):
            return
        call.expects_grad = m.expects_grad = True
        if self.split:
            call.x_edge = e.edge if e is not None and e.edge is not None else get_gradient_edge(x)
            call.out_edge = get_gradient_edge(out)
            prev = m.calls[-2] if len(m.calls) > 1 else None
            # ops between the two units; an in-place op (a ReLU) on the previous output leaves it the
            # same tensor, with another graph node
            if prev is not None and prev.out_edge is not None and (x is not prev_out
                                                                   or call.x_edge != prev.out_edge):
                call.link_edges = (call.x_edge, prev.out_edge)
        if e is not None and e.cell is not None:
            e.cell[0] = call      # the hook taken at entry: dE/dx_l of x_l as it came in
        else:
            x.register_hook(lambda g, c=call: self._on_grad(c, g))
        # dE/dx_L arrives at the output of the last unit called: hooked once the model's forward
        # ends (or now, for a unit called outside it; it moves the hook along)
        if m.top_handle is not None:
            m.top_handle.remove()
            m.top_handle = None
        m.top_pending = (call, out)
        if not self._in_model:
            self._hook_top(m)

    def _hook_top(self, m: Micro) -> None:
        call, out = m.top_pending
        m.top_pending = None
        edge = call.out_edge
        if edge is not None and out.requires_grad and get_gradient_edge(out) != edge:
            # the output was changed in place since the unit made it (a ReLU(inplace=True)):
            # dE/dx_L is the gradient at the unit's own output, taken at its graph node
            nr = edge.output_nr
            m.top_handle = edge.node.register_prehook(
                lambda gs, c=call: None if gs[nr] is None else self._on_top_grad(c, gs[nr]))
            return
        m.top_handle = out.register_hook(lambda g, c=call: self._on_top_grad(c, g))

    # -- backward -----------------------------------------------------------------------

    def _backward_pass(self, m: Micro) -> Optional[int]:
        """The number of the running backward pass for micro-batch ``m`` (None: too late)."""
        if m.final:
            self._warn("late", f"a backward pass reached the units of step {m.step} (micro {m.micro}) "
                       "after its rows were written (a retained graph's backward after the next forward "
                       "or optimizer step): it is not recorded")
            return None
        if not self._in_bw:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            self._in_bw, self._touched = True, []
        if m not in self._touched:
            self._touched.append(m)
        return m.passes.setdefault(self._bw_id, len(m.passes))

    def _end_backward(self) -> None:
        touched, self._touched, self._in_bw = self._touched, [], False
        for m in touched:
            p = m.passes[self._bw_id]
            m.done.append(p)
            if self.optimizer is None and self._weights.weight_quantities:
                if self._ranks is None:
                    m.weights[p] = self._weights.measure(self._groups, self.step)
                else:   # after DDP's (or FSDP's) own end-of-backward callback has reduced the gradients
                    torch.autograd.Variable._execution_engine.queue_callback(
                        lambda m=m, p=p: m.weights.__setitem__(p, self._weights.measure(self._groups, self.step)))
        self._bw_id += 1
        self._buffers.clear()

    def _on_top_grad(self, last: Call, g: Tensor) -> None:
        if self._busy:
            return
        m = last.micro
        p = self._backward_pass(m)
        if p is None:
            return
        self._top_forward(m)
        m.top[p] = stats.norm(g)
        if self.scaler is not None and getattr(self.scaler, "_scale", None) is not None \
                and self.scaler.is_enabled():
            m.scale[p] = self.scaler._scale.detach().clone()
        if self.split:
            self._carry(last, g, g)
        if self._paths is not None:
            self._busy = True
            try:
                self._paths.on_top(last, g)
            finally:
                self._busy = False

    def _top_forward(self, m: Micro) -> None:
        """Forward reductions of x_L, made once; x_L is then let go."""
        if m.last_out is None or m.top_fwd:
            return
        x_L, m.last_out = m.last_out, None
        t = Forward(x=x_L, step=m.step, is_top=True, stats=m.top_fwd)
        for q in self._q_fwd:
            if q.top and q.should_compute(m.step):
                m.top_fwd.update({k: v for k, v in q.forward(t).items() if k not in self._scalar_cols})

    def _on_grad(self, call: Call, g: Tensor) -> None:
        if self._busy:
            return
        p = self._backward_pass(call.micro)
        if p is None:
            return
        s = call.bwd.setdefault(p, {})
        d = call.direct
        t = Backward(grad=g, step=call.micro.step, info=call.info, stats=s, direct=d, direct_log_scale=call.direct_log_scale,
                     ref=call.ref, ref_log_scale=call.ref_log_scale, direct_norm=call.direct_norm,
                     residual=lambda: self._residual(g, d, call.direct_log_scale))
        for q in self._q_bwd:
            if (q.needs != "split" or d is not None) and q.should_compute(call.micro.step):
                s.update(q.backward(t))
        if "grad" in self.keep:
            self._keep(call, "grad", g, p)
        if self._paths is not None:
            self._busy = True
            try:
                self._paths.on_grad(call, g, p, (lambda t: self._keep(call, "paths", t, p))
                                    if "paths" in self.keep else None)
            finally:
                self._busy = False
        if not (self.split and d is not None):
            return
        if "direct" in self.keep:
            self._keep(call, "direct", d * _exp(call.direct_log_scale), p)
        if call.index > 0:
            prev = call.micro.calls[call.index - 1]
            v, vr = d, call.ref
            if call.link_edges is not None:  # ops between the two units
                try:
                    v, vr = self._grad(call.link_edges[0], call.link_edges[1], v, vr)
                except RuntimeError:    # its input is not computed from the previous unit's output
                    self._warn("unlinked", f"unit {call.index} ({call.info.name}) of step {call.micro.step} "
                               "does not take its input from the previous unit's output: the direct term "
                               "is not carried past it, and the split columns before it are NaN")
                    call.direct = call.ref = None
                    return
            self._carry(prev, v, vr, s.get("direct_norm") if v is d else None,
                        call.direct_log_scale, call.ref_log_scale, call.carries)
        call.direct = call.ref = None

    @property
    def paths(self):
        """dE/dx_l by path length (``paths=``): one row per unit, backward pass and length k.

        Columns as :func:`gradflow.tracing.paths.components.path_components`' table, plus ``micro``
        and ``backward``; k = -1 is the remainder beyond max_len.
        """
        if self._paths is None:
            raise GradflowError("this tracer does not split by path length: trace(model, paths=True) "
                                "(or paths=max_len)")
        return self._paths.table()

    def _keep(self, call: Call, name: str, t: Tensor, p: int) -> None:
        m = call.micro
        key = (m.step, call.index) if m.micro == 0 and p == 0 and m.phase == "train" \
            else (m.step, call.index, m.micro, p)
        self.tensors.setdefault(key, {})[name] = t.detach().to("cpu", copy=True)

    def _warn(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"gradflow.trace: {msg}", RuntimeWarning, stacklevel=3)

    def summary(self, step: Optional[int] = None, pool: bool = False, **kwargs) -> dict:
        """Fitted rates against the paper's predictions, per step (plain Python numbers).

        Args:
            step: the step to fit; None fits each recorded step.
            pool: fit all recorded steps together instead (said in the result: ``pooled_steps``).
            kwargs: passed to :func:`gradflow.theory.summarize`.
        Returns:
            One step's summary dict; with several steps and neither ``step`` nor
            ``pool``, ``{step: summary}``.

        This is the faces layer's call into theory: the import is late, so
        tracing never imports theory itself.
        """
        from gradflow.tracing.step_summary import summarize_steps
        return summarize_steps(self.units, step, pool, **kwargs)

    def __repr__(self) -> str:
        from gradflow.tracing.listing import unit_table
        return f"gradflow.Tracer of {type(self.model).__name__}: {len(self.infos)} units\n" + \
            unit_table(self.infos)


def _refuse_nested(model: nn.Module) -> None:
    """Refuse to trace modules that an active tracer has patched or records."""
    busy = next(((n, m) for n, m in model.named_modules() if id(m) in _ACTIVE), None)
    if busy is not None:
        n, m = busy
        raise GradflowError(
            f"module {n or type(m).__name__!r} of this model is already traced by an active "
            "gradflow.trace: nested traces of the same modules are not supported (the inner one "
            "would patch what the outer one records). Read everything from the outer trace, or "
            "leave it before starting another")


class _Run(Runner):
    """The runner a block's forward calls while traced (see :mod:`gradflow.tracing.parts`)."""

    def __init__(self, tracer: Tracer, group: _Group):
        self.tracer, self.group = tracer, group

    def unit_name(self, k: int) -> str:
        infos = self.group.infos
        return infos[k].name if k < len(infos) else f"{infos[0].module_name or infos[0].name}#{k}"

    def run_unit(self, k: int, parts, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        tr = self.tracer
        if k >= len(self.group.infos) or not isinstance(x, Tensor):
            return super().run_unit(k, parts, x, args, kwargs)
        call = tr._new_call(self.group.infos[k], self.group, parts, args)
        if self.group.params[k] is None:
            self.group.params[k] = _params(parts.owned_modules())
        tr._enter(x)
        tr._take_entry(call, x)
        if tr._q_before:
            tr._before_unit(call, x)
        # h = x itself unless the path split needs the identity shortcut as a node of its own
        out = run_parts(parts, x, tap=lambda **t: tr._tap(call, **t), args=args, kwargs=kwargs,
                        identity_node=tr._paths is not None)
        call.identity_shortcut = parts.shortcut is None
        call.has_post = parts.post is not None
        tr._after_unit(call, x, out)
        return out

    def on_enter(self, k: int, x: Tensor) -> None:
        if k < len(self.group.infos):
            self.tracer._enter(x)

    def run_add(self, k: int, x: Tensor, h: Tensor, r: Tensor) -> Tensor:
        tr = self.tracer
        if k >= len(self.group.infos):
            return h + r
        if not all(isinstance(t, Tensor) for t in (x, h, r)):
            raise GradflowError(f"unit {self.unit_name(k)!r}: its input, shortcut and branch must be tensors, "
                                f"got {type(x).__name__}, {type(h).__name__}, {type(r).__name__}; declare its "
                                "parts (units=[...], parts=...) so gradflow knows which tensor is x_l")
        call = tr._new_call(self.group.infos[k], self.group, None, ())
        tr._take_entry(call, x)
        identity = h is x
        if identity and tr._paths is not None:
            h = x.view_as(x)
        y = h + r
        tr._tap(call, x=x, z=x, shortcut_in=x, h=h, r=r, y=y, coef=1.0, out=y)
        call.identity_shortcut = identity
        tr._after_unit(call, x, y)
        return y


def _version(t: Tensor) -> int:
    """The tensor's in-place version counter (-1 for inference tensors, which keep none)."""
    return -1 if t.is_inference() else t._version


def _in_backward() -> bool:
    """Whether this thread is running a backward pass (a forward called from one is a recomputation).

    Read from torch's private ``_current_graph_task_id``; a torch without it cannot tell, and
    the first unit call says so once (activation checkpointing then goes unrecognised).
    """
    global _GRAPH_TASK_SAID
    if _GRAPH_TASK is None:
        if not _GRAPH_TASK_SAID:
            _GRAPH_TASK_SAID = True
            warnings.warn(f"gradflow.trace: torch {torch.__version__} has no torch._C._current_graph_task_id, "
                          "so gradflow cannot tell a unit re-run by activation checkpointing from a forward: "
                          "checkpointed units are then recorded as if run twice", RuntimeWarning, stacklevel=3)
        return False
    return _GRAPH_TASK() != -1


_GRAPH_TASK = getattr(torch._C, "_current_graph_task_id", None)
_GRAPH_TASK_SAID = False


def _first_tensor(out):
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next((o for o in out if isinstance(o, Tensor)), None)
    if isinstance(out, dict):
        return next((o for o in out.values() if isinstance(o, Tensor)), None)
    return None


def _shape(t) -> str:
    if not isinstance(t, Tensor):
        return ""
    s = _SHAPES.get(t.shape)
    if s is None:
        if len(_SHAPES) > 4096:
            _SHAPES.clear()
        s = _SHAPES[t.shape] = "x".join(map(str, t.shape[1:]))
    return s


_SHAPES: dict = {}


def trace(model: nn.Module, units: UnitsSpec = None, parts: PartsSpec = None, **kwargs) -> Tracer:
    """Trace ``model``'s residual units; use as ``with trace(model) as tr:``.

    See :class:`Tracer` for the options and the sharp edges.

    Args:
        model: the network: gradflow's zoo, torchvision, timm, Hugging Face, or your own.
        units: which modules are residual units; None finds them (see :class:`Tracer`).
        parts: the declared units' parts; None finds them.
        **kwargs: the other options of :class:`Tracer` (``split``, ``schedule``,
            ``optimizer``, ``quantities``, ``sinks``, ``paths``, ...).
    Returns:
        A :class:`Tracer`, attached when its ``with`` block is entered and
        detached when it is left (exceptions included); read ``tr.units``.
    """
    return Tracer(model, units=units, parts=parts, **kwargs)
