"""Finding the residual units of a network.

Order of preference: gradflow's own units and known third-party blocks
(torchvision, timm), found by class; units the user declares (a name pattern or
a list of modules, optionally with their parts); and, for any other network
whose code torch.fx can trace, the modules in which a residual addition happens.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..errors import GradflowError
from ..parts import Parts, as_fn
from .adapters import adapter_for, out_of_place

PartsSpec = Union[None, dict, Callable[[nn.Module], Parts]]
UnitsSpec = Union[None, str, Sequence[nn.Module]]


@dataclass
class UnitInfo:
    """A residual unit found in a model.

    ``parts`` is None for units known only by their input and output (then the
    direct/residual split is not available for them). ``scalar_coef`` is the
    closed-form coefficient of h (1 for a plain sum, lambda for constant
    scaling) or None where it depends on the data.
    """

    name: str
    module: nn.Module
    kind: str
    stage: Optional[int] = None
    parts: Optional[Callable[[], Parts]] = None
    scalar_coef: Optional[float] = None


def _kind(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__name__}"


def _known(name: str, m: nn.Module) -> Optional[UnitInfo]:
    from ..models.units import ResidualUnit  # models sit below tracing
    if isinstance(m, ResidualUnit):
        return UnitInfo(name, m, f"gradflow.{m.spec.unit}/{m.spec.shortcut}", m.stage,
                        m.parts, m.shortcut_scalar())
    factory = adapter_for(m)
    if factory is not None:
        return UnitInfo(name, m, _kind(m), None, lambda m=m: factory(m), 1.0)
    return None


def _declared_parts(m: nn.Module, spec: PartsSpec) -> Optional[Callable[[], Parts]]:
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


def find_units(model: nn.Module, units: UnitsSpec = None, parts: PartsSpec = None) -> list[UnitInfo]:
    """The residual units of ``model``, in module order, each with name, stage and parts.

    ``units``: None (find them), a pattern on module names (``"layer*.*"``;
    ``*`` stays within one dotted segment, ``**`` crosses them), a list of modules, or ``"fx"`` (find residual additions by
    tracing the code with torch.fx). ``parts``: for declared units, a dict of
    submodule names (``{"shortcut": "downsample", "branch": "residual"}``) or a
    function ``module -> Parts``.
    """
    if hasattr(model, "_orig_mod"):
        raise GradflowError("this model is torch.compile'd: trace the original module "
                            "(model._orig_mod) instead; hooks do not survive compilation")
    named = list(model.named_modules())
    if units is None:
        found = _find_known(named)
        if not found:
            found = _find_fx(model)
    elif isinstance(units, str) and units == "fx":
        found = _find_fx(model)
    else:
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
        found = []
        for n, m in chosen:
            info = _known(n, m) if parts is None else None
            found.append(info or UnitInfo(n, m, _kind(m), None, _declared_parts(m, parts), 1.0))
    if not found:
        raise GradflowError(
            f"no residual unit found in {type(model).__name__}: gradflow knows its own units, "
            "torchvision's and timm's ResNet blocks, and residual additions torch.fx can trace. "
            "Declare yours: trace(model, units='blocks.*') or units=[...], with "
            "parts={'shortcut': ..., 'branch': ...} for the direct/residual split")
    _assign_stages(found)
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
            found.append(info)
            inside = n
    return found


_ADD = {operator.add, operator.iadd, torch.add}


def _find_fx(model: nn.Module) -> list[UnitInfo]:
    """Modules whose forward adds a tensor to another computed from the same input."""
    try:
        import torch.fx as fx
        graph = fx.symbolic_trace(model).graph
    except Exception:  # untraceable code: fall through to the "declare" error
        return []
    ancestors: dict = {}
    names: list[str] = []
    for node in graph.nodes:
        anc = set()
        for a in node.all_input_nodes:
            anc |= ancestors[a] | {a}
        ancestors[node] = anc
        is_add = (node.op == "call_function" and node.target in _ADD) or (
            node.op == "call_method" and node.target in ("add", "add_"))
        if not is_add or len(node.all_input_nodes) != 2:
            continue
        a, b = node.all_input_nodes
        if a in ancestors[b] or b in ancestors[a] or (ancestors[a] & ancestors[b]) - _placeholders(graph):
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path = list(stack.values())[-1]
                path = path[0] if isinstance(path, tuple) else path
                if path and path not in names:
                    names.append(path)
    modules = dict(model.named_modules())
    return [UnitInfo(n, modules[n], _kind(modules[n])) for n in names if n in modules]


def _placeholders(graph) -> set:
    return {n for n in graph.nodes if n.op == "placeholder"}


_STAGE = re.compile(r"(?:layer|stage|stages|blocks?)[._]?(\d+)")


def _assign_stages(units: list[UnitInfo]) -> None:
    """Stage numbers from the units themselves or their names (``layer3.1`` -> 2)."""
    if all(u.stage is not None for u in units):
        return
    found = [_STAGE.search(u.name) for u in units]
    if all(found):
        nums = [int(f.group(1)) for f in found]
        base = min(nums)
        for u, k in zip(units, nums):
            u.stage = k - base
    else:  # a new stage wherever the unit's parent module changes
        parents = [u.name.rsplit(".", 1)[0] if "." in u.name else "" for u in units]
        stage = 0
        for i, u in enumerate(units):
            if i and parents[i] != parents[i - 1]:
                stage += 1
            u.stage = stage
