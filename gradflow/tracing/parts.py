"""The parts of a residual unit, and how a module runs one or more units from them.

A residual unit (docs/theory.md, section 1) is one residual addition::

    z     = preact(x)                    shared pre-activation (often absent)
    h     = shortcut(z or x)             the shortcut h; None means identity
    r     = branch(z, *args, **kwargs)   the residual branch F, with the unit's extra call arguments
    y, c  = combine(h, r, x)             sum, scaled sum or gates; c is h's coefficient
    x_out = post(y)                      the after-addition activation f; None means identity

Every unit gradflow knows, from its own zoo, torchvision, timm, an adapter or
declared by a user, is described by a :class:`Parts`, and :func:`run_parts` is
the single place that evaluates one. The zoo's units run through it in
``forward``; the tracer runs other units through it too, so the tensors h, F and
y exist as separate nodes of the autograd graph and the direct (shortcut-path)
term of dE/dx_l can be taken exactly.

The interface a module offers the tracer
----------------------------------------
A module is traced through a :class:`Block`: the names of the residual units it
holds (one for a ResNet block, two for a transformer block: ``("attn",
"mlp")``) and a ``forward(run, *args, **kwargs)`` that computes the module's
output from its parts, calling ``run.unit(k, parts, x, *extra, **kw)`` for its
k-th unit (the extra positional and keyword arguments go to that unit's
branch) and packing the result the way the module's own forward does (a
tensor, or a tuple for Hugging Face blocks). For example, a pre-LN block::

    def block(m):                        # m: the module; returns a Block
        def forward(run, x, mask=None):
            x = run.unit(0, Parts(branch=m.attn, preact=m.ln1), x, mask=mask)
            x = run.unit(1, Parts(branch=m.mlp, preact=m.ln2), x)
            return (x,)                  # the module's own output format
        return Block(("attn", "mlp"), forward)

A unit whose parts are only known as tensors (found in a torch.fx graph: the
two operands of an addition) calls ``run.add(k, x, h, r)`` instead: x is the
unit's input, h the shortcut side and r the branch side, both already computed
from x; it returns h + r. Such a block calls ``run.enter(k, x)`` as soon as x
exists, before anything uses it (the torch.fx blocks do): the tracer then
measures x_l and dE/dx_l at the input as given, even when the branch
overwrites it in place (``run.unit`` does this itself; without ``enter`` an
``add`` unit's input is measured at the addition). A single :class:`Parts` is the one-unit block
``forward(run, x, *a, **k) = run.unit(0, parts, x, *a, **k)``.

Without a tracer the same forward runs with :data:`PLAIN` as ``run``, which
computes exactly the module's function, so a block can also be a module's own
``forward``. The tracer checks every block against the module's own forward
on its first traced call (:mod:`gradflow.tracing.check`): parts are never
trusted.

A module is a unit by protocol, not by class: anything with a ``parts()``
method (returning :class:`Parts` or :class:`Block`) and a ``stage`` attribute
(an int, or None to let the tracer number stages by shape) is found as such;
``shortcut_scalar()`` (the closed-form coefficient of h, or None) and
``spec`` (with ``unit`` and ``shortcut`` names) are read when present.
"""
from __future__ import annotations

import inspect
import types
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Union, runtime_checkable

import torch
from torch import Tensor

Fn = Callable[..., Tensor]


def combine_sum(h: Tensor, r: Tensor, x: Tensor) -> tuple[Tensor, float]:
    """y = h + F, the original and pre-activation units."""
    return h + r, 1.0


@dataclass
class Parts:
    """A residual unit split into the parts the paper names.

    ``shortcut=None`` is the identity; ``shortcut_preact`` says whether the
    shortcut reads the pre-activated tensor (the official pre-activation code's
    projection units) or the raw input. ``combine`` returns ``(y, c)`` where
    ``c`` is the coefficient h is multiplied by (1, lambda, or 1 - g(x)).
    ``branch`` receives the unit's extra call arguments, if it was called with
    any. ``modules``: the modules whose parameters belong to this unit (for the
    weight quantities), when the parts are closures rather than modules; by
    default the parts that are modules, or the whole module of a one-unit block.
    """

    branch: Fn
    shortcut: Optional[Fn] = None
    combine: Callable[[Tensor, Tensor, Tensor], tuple] = combine_sum
    post: Optional[Fn] = None
    preact: Optional[Fn] = None
    shortcut_preact: bool = False
    modules: tuple = ()

    def owned_modules(self) -> list:
        """The modules whose parameters belong to this unit (see ``modules``)."""
        if self.modules:
            return list(self.modules)
        fields = (self.preact, self.shortcut, self.branch, self.combine, self.post)
        return [f for f in fields if isinstance(f, torch.nn.Module)]


class Tap(Protocol):
    def __call__(self, *, x: Tensor, z: Tensor, shortcut_in: Tensor, h: Tensor, r: Tensor,
                 y: Tensor, coef, out: Tensor) -> None: ...


def run_parts(parts: Parts, x: Tensor, tap: Optional[Tap] = None, args: tuple = (),
              kwargs: Optional[dict] = None, identity_node: bool = True) -> Tensor:
    """Evaluate a unit from its parts. ``tap`` (the tracer) sees every intermediate.

    Args:
        parts: the unit.
        x: its input x_l.
        tap: called once with x, z, shortcut_in, h, r, y, coef and out.
        args, kwargs: the unit's extra call arguments, passed to ``parts.branch``.
        identity_node: with a tap, make an identity shortcut's h a view of its
            input (below); False keeps h = x (a tap that never separates the two
            paths through h: the view stops autograd from summing dE/dx in place).
    Returns:
        x_{l+1}.

    With a tap, an identity shortcut becomes a view of its input so that h is a
    node of its own in the autograd graph (needed to separate the shortcut path
    from the residual path); without one, nothing extra is computed.
    """
    z = parts.preact(x) if parts.preact is not None else x
    shortcut_in = z if parts.shortcut_preact else x
    if parts.shortcut is not None:
        h = parts.shortcut(shortcut_in)
    else:
        h = shortcut_in.view_as(shortcut_in) if tap is not None and identity_node else shortcut_in
    r = parts.branch(z, *args, **kwargs) if (args or kwargs) else parts.branch(z)
    y, coef = parts.combine(h, r, x)
    out = parts.post(y) if parts.post is not None else y
    if tap is not None:
        if out is y and parts.post is not None:
            raise RuntimeError(
                "the unit's after-addition activation ran in place on h + F; declare "
                "an out-of-place post (for example torch.relu) so gradflow can trace it")
        tap(x=x, z=z, shortcut_in=shortcut_in, h=h, r=r, y=y, coef=coef, out=out)
    return out


class Runner:
    """The base of every runner: what a :class:`Block`'s forward calls for each of its units.

    A block's forward calls three hooks (see the module docstring): ``unit(k, parts,
    x, *args, **kwargs)``, ``add(k, x, h, r)`` and ``enter(k, x)``. They are defined
    here, once, for every runner (the tracer's, the path split's, the lesion's, and
    any later one), so a block written for one runner runs with all of them: a hook
    added here exists in each. A runner changes what happens by overriding the
    ``run_unit`` / ``run_add`` / ``on_enter`` methods, which by default compute
    exactly the module's function, and names its units with ``unit_name(k)``.

    ``unit`` first checks that the unit's declared branch takes the extra call
    arguments it was called with (a clear :class:`~gradflow.errors.GradflowError`
    naming the unit, the argument and what to declare instead, never a raw
    ``TypeError`` from inside the branch).
    """

    def unit(self, k: int, parts: Parts, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args or kwargs:
            check_extras(self.unit_name(k), parts, args, kwargs)
        return self.run_unit(k, parts, x, args, kwargs)

    def add(self, k: int, x: Tensor, h: Tensor, r: Tensor) -> Tensor:
        return self.run_add(k, x, h, r)

    def enter(self, k: int, x: Tensor) -> None:
        self.on_enter(k, x)

    # -- what a runner overrides -------------------------------------------------------

    def run_unit(self, k: int, parts: Parts, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """Unit k from its parts (its extras already checked); by default the plain function."""
        return run_parts(parts, x, None, args, kwargs)

    def run_add(self, k: int, x: Tensor, h: Tensor, r: Tensor) -> Tensor:
        """Unit k known as the addition h + r of two tensors computed from its input x."""
        return h + r

    def on_enter(self, k: int, x: Tensor) -> None:
        """Unit k's input x exists now, before anything uses it."""

    def unit_name(self, k: int) -> str:
        """Unit k's name, for messages."""
        return f"#{k}"


PLAIN: Runner = Runner()   # the runner without a tracer: the module's own function, nothing recorded


def check_extras(name: str, parts: Parts, args: tuple, kwargs: dict) -> None:
    """Refuse, by name, extra call arguments that the unit's declared branch does not take."""
    fn = parts.branch
    bad = _untaken(fn, len(args), tuple(kwargs))
    if not bad:
        return
    what = ", ".join(bad)
    kw = next((k for k in kwargs if f"keyword argument {k!r}" in bad), "mask")
    desc = type(fn).__name__ if isinstance(fn, torch.nn.Module) else getattr(fn, "__qualname__", repr(fn))
    from gradflow.errors import GradflowError
    raise GradflowError(
        f"unit {name!r} is called with {what}, which its declared branch ({desc}) does not take. "
        f"Declare parts whose branch takes it, e.g. parts=lambda m: Parts(branch=lambda z, {kw}=None: ..., "
        f"shortcut=...), or a Block whose forward(run, x, {kw}=None) passes it where the module's own "
        "forward does (gradflow.tracing.parts)")


def _untaken(fn, n_args: int, kw: tuple) -> list:
    """The extra arguments (beyond the branch's input) that ``fn``'s signature cannot take."""
    key = (n_args, kw)
    try:
        cache = _TAKES.setdefault(fn, {})
    except TypeError:       # not weak-referenceable (a bound method): look it up each time
        cache = {}
    if key in cache:
        return cache[key]
    try:
        # a module's own signature is __call__'s (*args, **kwargs): read its forward's
        params = inspect.signature(fn.forward if isinstance(fn, torch.nn.Module) else fn).parameters.values()
    except (TypeError, ValueError):       # no signature to read (a builtin): let the call speak
        cache[key] = []
        return []
    kinds = {p.kind for p in params}
    bad = []
    if inspect.Parameter.VAR_POSITIONAL not in kinds:
        n_pos = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
        bad += [f"positional argument {i + 2}" for i in range(max(0, n_args + 1 - n_pos))]
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        bad += [f"keyword argument {k!r}" for k in kw if k not in names]
    cache[key] = bad
    return bad


_TAKES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass
class Block:
    """A module as one or more residual units run in sequence.

    ``names``: one per unit, in call order (``("",)`` for a module that is one
    unit; its rows are then named after the module alone). ``forward(run,
    *args, **kwargs)``: the module's forward written with ``run.unit`` /
    ``run.add``, returning what the module returns. ``unit_modules``: per unit,
    the modules whose parameters belong to it (weight quantities); empty means
    the parts' modules, or the whole module for a one-unit block.
    """

    names: tuple
    forward: Callable[..., Any]
    unit_modules: tuple = ()
    parts: Optional[Parts] = None      # the unit's parts, for a one-unit block made by single()

    def __post_init__(self) -> None:
        self.names = tuple(self.names)
        if not self.names:
            raise ValueError("a Block holds at least one residual unit")


def single(parts: Parts) -> Block:
    """The one-unit block of ``parts``: extra call arguments go to the branch."""
    def forward(run: Runner, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return run.unit(0, parts, x, *args, **kwargs)
    return Block(("",), forward, parts=parts)


def as_block(p: Union[Parts, Block]) -> Block:
    """A :class:`Block` from what a ``parts()`` method or an adapter returns."""
    if isinstance(p, Block):
        return p
    if isinstance(p, Parts):
        return single(p)
    raise TypeError(f"parts() returned {type(p).__name__}: expected gradflow.tracing.parts.Parts or Block")


@runtime_checkable
class ResidualModule(Protocol):
    """The protocol by which tracing finds a unit without knowing its class."""

    stage: Optional[int]

    def parts(self) -> Union[Parts, Block]: ...


def is_residual_module(m: Any) -> bool:
    """True for modules following :class:`ResidualModule` (a ``parts()`` method and a ``stage``)."""
    return isinstance(m, torch.nn.Module) and callable(getattr(m, "parts", None)) and hasattr(m, "stage")


def as_fn(module) -> Optional[Fn]:
    """``None`` for absent or identity modules, else the module (a callable)."""
    if module is None or isinstance(module, torch.nn.Identity):
        return None
    return module


def forward_runs_parts(module) -> bool:
    """Whether ``module``'s forward is, by definition, ``run_parts(module.parts(), x)``.

    A class says so with ``forward_is_parts = True`` beside the ``forward`` that does it
    (gradflow's own units). Then checking the parts against the forward compares a
    computation with itself, so the tracer skips that check. A subclass that defines
    its own forward, or an instance whose forward was replaced, is checked as usual.
    """
    cls = type(module)
    if "forward" in vars(module):
        return False
    for k in cls.__mro__:
        if "forward_is_parts" in vars(k):
            return bool(vars(k)["forward_is_parts"]) and cls.forward is vars(k).get("forward")
    return False


@contextmanager
def patched_forwards(modules_forwards):
    """Set ``module.forward`` to each (module, function(self_module, ...)); restore all on exit.

    The one place that swaps forwards outside the tracer (lesions, the path split):
    an instance attribute that was there before comes back, one that was not is deleted.
    """
    saved = []
    try:
        for module, fn in modules_forwards:
            saved.append((module, "forward" in module.__dict__, module.__dict__.get("forward")))
            module.forward = fn if isinstance(fn, types.MethodType) else types.MethodType(fn, module)
        yield
    finally:
        for module, had, old in reversed(saved):
            if had:
                module.forward = old
            else:
                del module.forward
