"""Finding the residual units of a network.

Order of preference: modules that follow the unit protocol (a ``parts()``
method and a ``stage``: gradflow's own units, see :mod:`gradflow.tracing.parts`) and
blocks with a registered adapter (torchvision, timm, ...), found by class;
units the user declares (a name pattern or a list of modules, optionally with
their parts); and, for any other network, the residual additions seen as it
runs, judged by the autograd graph of that forward (:mod:`.runtime`; the
tracer does this on its first forward, :func:`find_units` on ``example=``).
torch.fx (``units="fx"``, and declared units without parts) reads parts from
the code where it can (:mod:`gradflow.tracing.fxgraph`).

One module may hold several units (a transformer block: attention, then MLP);
each is a :class:`UnitInfo` of its own, named ``<module>.<slot>``, sharing the
module's :class:`~gradflow.tracing.parts.Block`.

Stages: a unit that knows its stage (the zoo's) keeps it. Otherwise stages are
first guessed from names (``layer3.1`` -> 2, ``stages.1.blocks.0`` -> 1, else a
new stage where the parent module changes) and, on the first traced forward,
renumbered as runs of consecutive units whose output keeps the shape of the
previous unit's output: the stretches where the direct path is the identity.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch.nn as nn

from gradflow.errors import GradflowError
from gradflow.tracing.parts import Block, Parts, as_block, as_fn, is_residual_module
from gradflow.tracing.adapters import adapter_for, out_of_place
from gradflow.tracing.fxgraph import fx_block, residual_module_paths

PartsSpec = Union[None, dict, Callable[[nn.Module], Union[Parts, Block]]]
UnitsSpec = Union[None, str, Sequence[nn.Module]]


@dataclass
class UnitInfo:
    """A residual unit found in a model.

    ``parts`` is None for units known only by their module's input and output
    (then the direct/residual split is not available for them, and ``note``
    says why); else it returns the module's :class:`~gradflow.tracing.parts.Block`, of
    which this unit is number ``slot``. ``scalar_coef`` is the closed-form
    coefficient of h (1 for a plain sum, lambda for constant scaling) or None
    where it depends on the data. ``found``: ``zoo`` (the unit protocol),
    ``adapter``, ``declared``, ``fx`` or ``run`` (seen as the network ran:
    :mod:`.runtime`). ``role``: ``depth`` (a unit of the depth sequence),
    ``sub-unit`` (a residual addition inside another unit's branch), ``sum``
    (a parallel branch sum with no identity operand) or ``folded`` (a unit
    whose input's first dimension is not the batch: MobileViT folds patches
    into it); only depth units are recorded. ``site``: for units found at run time, where the addition
    happens (:class:`~gradflow.tracing.runtime.Site`).
    """

    name: str
    module: nn.Module
    kind: str
    stage: Optional[int] = None
    parts: Optional[Callable[[], Block]] = None
    scalar_coef: Optional[float] = None
    found: str = "declared"
    slot: int = 0
    note: str = ""
    stage_fixed: bool = False      # the stage comes from the unit itself, not from shapes
    x_shape: str = ""              # the input's shape (without the batch), once traced
    owned: tuple = field(default=(), repr=False)  # modules/parameters of this unit (weight quantities)
    module_name: str = ""          # the module's path (the unit's name without its slot)
    role: str = "depth"            # "depth", "sub-unit" or "sum" (see above)
    site: Any = field(default=None, repr=False)  # run-time units: where the addition happens

    def __post_init__(self) -> None:
        if not self.module_name and self.slot == 0:
            self.module_name = self.name

    @property
    def split(self) -> bool:
        """Whether the direct/residual split is available for this unit."""
        return self.parts is not None or (self.found == "run" and self.role == "depth"
                                          and not self.note.startswith("no split"))


def _kind(m: nn.Module) -> str:
    spec = getattr(m, "spec", None)
    if spec is not None and hasattr(spec, "unit") and hasattr(spec, "shortcut"):
        return f"gradflow.{spec.unit}/{spec.shortcut}"
    return f"{type(m).__module__}.{type(m).__name__}"


def _expand(name: str, m: nn.Module, block: Block, found: str, stage: Optional[int],
            coef: Optional[float], fixed: bool, rebuild: Callable[[], Block]) -> list[UnitInfo]:
    """One UnitInfo per unit of the module's block; ``rebuild`` makes the block from the module
    as it is when called (a trace attaches with the unit's current submodules)."""
    kind = _kind(m)
    out = []
    for k, slot in enumerate(block.names):
        full = name if len(block.names) == 1 else (f"{name}.{slot}" if name else slot)
        if block.unit_modules:
            owned = tuple(block.unit_modules[k])
        elif len(block.names) == 1:
            owned = (m,)
        else:
            owned = ()
        out.append(UnitInfo(full, m, kind, stage, rebuild, coef, found, k,
                            stage_fixed=fixed, owned=owned, module_name=name))
    return out


def _known(name: str, m: nn.Module) -> Optional[list[UnitInfo]]:
    if is_residual_module(m):
        block = as_block(m.parts())
        scalar = getattr(m, "shortcut_scalar", None)
        coef = scalar() if callable(scalar) else None
        stage = getattr(m, "stage", None)
        return _expand(name, m, block, "zoo", stage, coef, stage is not None, lambda: as_block(m.parts()))
    adapter = adapter_for(m)
    if adapter is not None:
        return _expand(name, m, as_block(adapter.factory(m)), "adapter", adapter.stage,
                       adapter.scalar_coef, adapter.stage is not None, lambda: as_block(adapter.factory(m)))
    return None


def _declared_parts(m: nn.Module, spec: PartsSpec) -> Optional[Callable[[], Union[Parts, Block]]]:
    if spec is None:
        return None
    if callable(spec):
        return lambda: spec(m)
    allowed = {"shortcut", "branch", "post", "preact", "shortcut_preact"}
    bad = set(spec) - allowed
    if bad or "branch" not in spec:
        raise GradflowError(f"parts={spec!r}: give a dict with 'branch' and any of "
                            f"{sorted(allowed - {'branch'})} (submodule names or callables)")

    def get(key):
        v = spec.get(key)
        if v is None or callable(v) and not isinstance(v, str):
            return v
        try:
            return m.get_submodule(v)
        except AttributeError:
            raise GradflowError(f"parts {key}={v!r}: {type(m).__name__} has no submodule {v!r}; "
                                f"its children are {[n for n, _ in m.named_children()]}") from None

    def build() -> Parts:
        return Parts(branch=get("branch"), shortcut=as_fn(get("shortcut")),
                     post=out_of_place(get("post")), preact=as_fn(get("preact")),
                     shortcut_preact=bool(spec.get("shortcut_preact", False)))
    return build


def find_units(model: nn.Module, units: UnitsSpec = None, parts: PartsSpec = None,
               example: Any = None) -> list[UnitInfo]:
    """The residual units of ``model``, in module order, each with name, stage and parts.

    Args:
        model: any ``nn.Module``.
        units: None (find them), a pattern on module names (``"layer*.*"``; ``*``
            stays within one dotted segment, ``**`` crosses them), a list of
            modules, ``"fx"`` (find residual additions by reading the code with
            torch.fx) or ``"run"`` (find them as the network runs, even where
            its blocks are known by class).
        parts: for declared units, a dict of submodule names (``{"shortcut":
            "downsample", "branch": "residual"}``) or a function ``module ->
            Parts | Block``. Declared units without parts get theirs from
            torch.fx where it can read them.
        example: an input (a tensor, a tuple of positional arguments, or a dict
            of keyword arguments) to run once, for a network whose units are
            found as it runs; the model's buffers and the RNG are left as they were.
    Returns:
        The units, in module order (found at run time: in call order, depth units only;
        :func:`gradflow.units` lists sub-units and sums too).
    """
    found, runtime = plan_units(model, units, parts)
    if not runtime:
        return found
    if example is not None:
        from gradflow.tracing.listing import units as listed
        return [u for u in listed(model, example=example, units=units, parts=parts) if u.role == "depth"]
    if units is None:   # nothing to run: read the code, where torch.fx can
        found, reason = _find_fx(model)
        if found:
            assign_stages(found)
            return found
    raise GradflowError(
        f"the units of {type(model).__name__} are found as it runs (no block is known by class and "
        "none is declared), and there is no example to run"
        + (f"; torch.fx cannot read it either ({reason})" if units is None and reason else "")
        + ": give example= (an input to run once), or trace it (the tracer finds them on its first "
        "forward), or declare them: units='blocks.*', parts={'shortcut': ..., 'branch': ...}")


def plan_units(model: nn.Module, units: UnitsSpec = None, parts: PartsSpec = None) -> tuple[list, bool]:
    """The units known without running the model, and whether the rest must be found as it runs.

    Returns ``(units, False)`` for units known by class, declared or read by
    torch.fx, ``([], True)`` when the units are found on the first forward.
    """
    if hasattr(model, "_orig_mod"):
        raise GradflowError("this model is torch.compile'd: trace the original module "
                            "(model._orig_mod) instead; hooks do not survive compilation")
    if isinstance(units, str) and units == "run":
        return [], True
    named = list(model.named_modules())
    if units is None:
        found = _find_known(named)
        if not found:
            return [], True
    elif isinstance(units, str) and units == "fx":
        found, reason = _find_fx(model)
        if not found:
            why = f" torch.fx could not read this model: {reason}." if reason else ""
            raise GradflowError(
                f"no residual unit found by torch.fx in {type(model).__name__}.{why} Leave units= out "
                "(units are then found as the network runs) or declare them: trace(model, "
                "units='blocks.*') or units=[...], with parts={'shortcut': ..., 'branch': ...}")
    else:
        found = _find_declared(model, named, units, parts)
    assign_stages(found)
    return found, False


def _find_declared(model, named, units, parts) -> list[UnitInfo]:
    if isinstance(units, str):
        rx = _pattern(units)
        chosen = [(n, m) for n, m in named if n and rx.fullmatch(n)]
        if not chosen:
            raise GradflowError(f"units={units!r} matches no module name; names look like "
                                f"{[n for n, _ in named[1:6]]}")
    else:
        ids = {id(m) for m in units}
        chosen = [(n, m) for n, m in named if id(m) in ids]
        if len(chosen) != len(ids):
            raise GradflowError("units=[...] holds modules that are not part of this model")
    leaves = {id(m) for _, m in chosen}
    found: list[UnitInfo] = []
    for n, m in chosen:
        known = _known(n, m) if parts is None else None
        if known:
            found += known
            continue
        factory = _declared_parts(m, parts)
        if factory is not None:
            found += _expand(n, m, as_block(factory()), "declared", None, 1.0, False,
                             lambda f=factory: as_block(f()))
            continue
        block, why = fx_block(m, leaves)
        if block is not None:
            found += _expand(n, m, block, "fx", None, 1.0, False, _fx_rebuild(n, m, leaves))
        else:
            found.append(UnitInfo(n, m, _kind(m), None, None, 1.0, "declared",
                                  note=f"no split: no parts declared, and {why}", owned=(m,)))
    return found


def _pattern(pattern: str) -> "re.Pattern":
    """Module-path pattern: ``*`` within one path segment, ``**`` across segments."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _find_known(named) -> list[UnitInfo]:
    found, inside = [], None
    for n, m in named:
        if inside is not None and n.startswith(inside + "."):
            continue  # never descend into a unit
        info = _known(n, m)
        if info is not None:
            found += info
            inside = n
    return found


def _fx_rebuild(name: str, m: nn.Module, leaves: set) -> Callable[[], Block]:
    """The block torch.fx reads from ``m`` as it is when called (its graph holds the submodules)."""
    def rebuild() -> Block:
        block, why = fx_block(m, leaves)
        if block is None:
            raise GradflowError(f"unit {name!r}: its parts came from torch.fx, which cannot read the "
                                f"module as it is now ({why}); declare parts= for it")
        return block
    return rebuild


def _find_fx(model: nn.Module) -> tuple[list[UnitInfo], str]:
    """Units from the residual additions torch.fx finds, each with parts from the graph."""
    paths, reason = residual_module_paths(model)
    modules = dict(model.named_modules())
    paths = [p for p in paths if p in modules]
    leaves = {id(modules[p]) for p in paths}
    found: list[UnitInfo] = []
    for p in paths:
        m = modules[p]
        block, why = fx_block(m, leaves)
        if block is not None:
            found += _expand(p, m, block, "fx", None, 1.0, False, _fx_rebuild(p, m, leaves))
        else:
            found.append(UnitInfo(p, m, _kind(m), None, None, 1.0, "fx",
                                  note=f"no split: {why}", owned=(m,)))
    return found, reason


_STAGE = re.compile(r"(?:^|\.)(?:layer|stages?)[._]?(\d+)")


def assign_stages(units: list[UnitInfo]) -> None:
    """Provisional stage numbers from the units' names (``layer3.1`` -> 2); fixed ones are kept."""
    if all(u.stage is not None for u in units):
        return
    found = [_STAGE.search(u.module_name) for u in units]
    if all(found):
        nums = [int(f.group(1)) for f in found]
        base = min(nums)
        for u, k in zip(units, nums):
            if u.stage is None:
                u.stage = k - base
        return
    parents = [u.module_name.rsplit(".", 1)[0] if "." in u.module_name else "" for u in units]
    stage = 0
    for i, u in enumerate(units):
        if i and parents[i] != parents[i - 1]:
            stage += 1
        if u.stage is None:
            u.stage = stage


def renumber_stages(units: list[UnitInfo], out_shapes: list[str]) -> None:
    """Stages as runs of consecutive units whose output keeps the previous unit's output shape.

    ``units`` in call order, with their output shapes; units whose stage is
    fixed by the unit itself are left alone.
    """
    if all(u.stage_fixed for u in units):
        return
    stage, prev, seen = 0, None, set()
    for u, shape in zip(units, out_shapes):
        if id(u) in seen:
            continue
        seen.add(id(u))
        if prev is not None and shape != prev:
            stage += 1
        prev = shape
        if not u.stage_fixed:
            u.stage = stage
