"""Parts are checked, never trusted: a unit's parts against its own forward.

On the first traced call of each module, its own forward runs once more on a
copy of the same arguments, in the same mode, under ``no_grad``, with its
buffers (BatchNorm running statistics) restored afterwards and the random
number stream forked (so the traced run draws the very numbers the untraced
one would). Its output is compared with what the parts computed; a mismatch
is a :class:`~gradflow.errors.GradflowError` naming the unit, its parts and
the size of the difference. Cost: one extra forward per module per trace.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from gradflow.errors import GradflowError
from gradflow.utils.state import untouched


class Uncopyable(Exception):
    """An argument the check cannot copy, so running the module's own forward could change it."""


def _tensors_in(obj: Any, out: dict, depth: int = 0) -> None:
    """Every tensor reachable from ``obj`` through containers and attributes (caches hold them there)."""
    if depth > 6:
        return
    if isinstance(obj, Tensor):
        out.setdefault(id(obj), obj)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _tensors_in(v, out, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors_in(v, out, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        for v in vars(obj).values():
            _tensors_in(v, out, depth + 1)


def _copy_arg(a: Any) -> Any:
    if isinstance(a, Tensor):
        return a.detach().clone()
    try:
        return copy.deepcopy(a)     # caches and other mutable state the module may update
    except Exception:
        pass
    # Non-leaf tensors refuse deepcopy (a Hugging Face DynamicCache holds them): give deepcopy
    # detached clones of every tensor inside, so the copy shares nothing with the live object.
    found: dict = {}
    _tensors_in(a, found)
    memo = {i: t.detach().clone() for i, t in found.items()}
    try:
        return copy.deepcopy(a, memo)
    except Exception as e:
        raise Uncopyable(f"{type(a).__name__} ({type(e).__name__}: {e})") from None


def reference_output(original: Callable, module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The module's own forward on copies of ``args``/``kwargs``, leaving no trace behind.

    Raises :class:`Uncopyable` when an argument cannot be copied: the module's own forward
    would then run on the live object (a cache it appends to) and change the traced run.
    """
    leaves, _ = tree_flatten((args, kwargs))
    device = next((t.device for t in leaves if isinstance(t, Tensor)), torch.device("cpu"))
    a, k = tree_map(_copy_arg, (args, kwargs))
    with untouched(module, device), torch.no_grad():
        return original(*a, **k)


def compare(name: str, described: str, ref: Any, got: Any) -> None:
    """Raise if the parts' output ``got`` differs from the module's own ``ref``."""
    r_leaves, r_spec = tree_flatten(ref)
    g_leaves, g_spec = tree_flatten(got)
    if len(r_leaves) != len(g_leaves):
        raise GradflowError(
            f"unit {name!r}: its parts ({described}) return {len(g_leaves)} outputs where the module's "
            f"own forward returns {len(r_leaves)} ({r_spec} vs {g_spec}); fix the adapter or the "
            "declared parts")
    worst, scale = 0.0, 0.0
    for r, g in zip(r_leaves, g_leaves):
        if not (isinstance(r, Tensor) and isinstance(g, Tensor)):
            continue
        if r.shape != g.shape:
            raise GradflowError(f"unit {name!r}: its parts ({described}) give an output of shape "
                                f"{tuple(g.shape)} where the module's own forward gives {tuple(r.shape)}; "
                                "declare the right parts")
        if not r.is_floating_point():
            if not torch.equal(r, g):
                worst = max(worst, float("inf"))
            continue
        r32, g32 = r.detach().float(), g.detach().float()
        d = float((r32 - g32).abs().max()) if r.numel() else 0.0
        m = float(r32.abs().max()) if r.numel() else 0.0
        low = r.dtype in (torch.float16, torch.bfloat16)
        tol = (2e-2 if low else 1e-4) * max(m, 1e-3) + (1e-3 if low else 1e-6)
        if not d <= tol:    # NaN-safe
            worst, scale = max(worst, d) if d == d else float("nan"), max(scale, m)
    if worst != 0.0:
        raise GradflowError(
            f"unit {name!r}: the output computed from its parts ({described}) differs from the "
            f"module's own forward by up to {worst:.3g} (the output's largest value is {scale:.3g}); "
            "every number recorded would be about a different network. Declare the parts that "
            "compute this module (parts={'branch': ..., 'shortcut': ..., 'preact': ..., 'post': ...} "
            "or a function module -> Parts/Block)")


def describe(block, module: nn.Module) -> str:
    """A short description of a block's parts: unit names and, for one unit, its part modules."""
    names = [n for n in block.names if n]
    label = getattr(block.forward, "__qualname__", "")
    parts = getattr(block, "parts", None)
    if parts is not None:
        sub = {id(m): n for n, m in module.named_modules()}
        fields = []
        for f in ("preact", "shortcut", "branch", "post"):
            v = getattr(parts, f)
            if v is None:
                continue
            fields.append(f"{f}={sub.get(id(v), getattr(v, '__name__', type(v).__name__))!r}")
        return ", ".join(fields)
    return f"units {names} of {label}" if names else label
