"""Residual units found as the network runs: every tensor addition, judged by the autograd graph.

On one forward, a :class:`~torch.overrides.TorchFunctionMode` sees every
addition (``a + b``, ``torch.add``, ``a += b``, ``add_``) as it happens, and
forward pre/post hooks on every module say in which module (and which call of
it) it happens. The autograd graph of that forward then says what each
addition is:

* **a residual unit** when one operand is computed from the other through a
  learned branch: walking the other operand's graph (``grad_fn`` /
  ``next_functions``) reaches this operand's node, and a parameter feeds a
  node on the way. That operand is the shortcut (x_l, an identity h), the
  other the branch. Walks are bounded by autograd's sequence numbers: a node
  made before x_l cannot lie between x_l and the sum, so a walk covers the
  branch, not the network;
* **a parallel residual block** (``x + attn(LN x) + mlp(LN x)``) when an
  addition adds a learned branch of the same x_l to a unit's sum: one unit
  whose branch is the sum of both;
* **a projection unit** when both operands are computed from the input of the
  module the addition happens in and the shape changes (``downsample(x) +
  branch(x)``): the shortcut h is the operand without parameters, else the
  one with the shorter graph;
* **a parallel branch sum** (RepVGG, Inception-style) when both operands are
  learned from that input and the shape is kept: no identity operand;
* nothing, when no operand is computed from the other through a parameter
  (biases, masks, position embeddings, ``x + 0.044715 * x**3``).

A unit or a sum whose output lies inside a later unit's branch is nested
(ConvNeXt-V2's GRN, a transformer inside a conv block): it is a sub-unit of
that unit, named with its parent, and not on the depth path. The units on the
depth path are the sequence the paper's analysis is about.

Each found addition is named by the path of the module it happens in, with
``.call<k>`` where that module is called more than once in a forward (ALBERT's
shared layer) and ``.add<k>`` where one call holds several found additions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode

ADDS = frozenset({torch.Tensor.add, torch.add, torch.Tensor.add_})
INPLACE = frozenset({torch.Tensor.add_})
_LEAF_SEQ = -1          # an input leaf: made before everything


@dataclass
class Site:
    """Where a found addition happens on the forward: the module it happens in (its path, and
    which call of it), the additions that take x_l (``entry``) and make the sum (``exit``),
    numbered in the order the forward makes them (counting every addition of two floating
    tensors of one shape), which operand of the entry addition is x_l (``shortcut``) and
    which operand of the exit addition is the shortcut side (``exit_shortcut``: the
    branch is the other), and whether x_l is instead the module's input
    (``fork="input"``, a projection unit)."""

    path: str
    call: int
    entry: int
    exit: int
    shortcut: int
    exit_shortcut: int
    fork: str


@dataclass
class Found:
    """One residual addition (or parallel sum) found on a forward, in call order.

    ``kind``: ``unit`` (identity shortcut), ``parallel`` (a parallel residual
    block: one x_l, a branch that is a sum), ``projection`` (a shortcut with
    operations of its own), ``sum`` (a parallel branch sum with no identity
    operand). ``parent``: the unit in whose branch it lies (None on the depth
    path). ``shortcut``: which operand of the exit addition is h (0 or 1);
    ``fork``: where x_l comes from: ``"operand"`` (x_l is h), or ``"input"``
    (x_l is the input of the module the addition happens in).
    """

    kind: str
    entry: "_Add"
    exit: "_Add"
    shortcut: int
    fork: str
    x_node: Any
    params: list = field(default_factory=list)
    entry_shortcut: int = 0
    parent: Optional["Found"] = None
    name: str = ""
    note: str = ""
    made_by: str = ""           # the path of the innermost module that returned the branch operand


class _Add:
    """An addition seen on the discovery forward."""

    __slots__ = ("order", "stack", "a", "b", "na", "nb", "y", "ny", "inplace", "owner_input")

    def __init__(self, order, stack, a, b, na, nb, inplace, owner_input):
        self.order, self.stack, self.a, self.b, self.na, self.nb = order, stack, a, b, na, nb
        self.inplace, self.owner_input = inplace, owner_input
        self.y = self.ny = None

    @property
    def path(self) -> str:
        return self.stack[-1][0] if self.stack else ""


def site(f: "Found") -> Site:
    """The :class:`Site` of a found addition."""
    path, call = f.exit.stack[-1] if f.exit.stack else ("", 0)
    return Site(path, call, f.entry.order, f.exit.order, f.entry_shortcut, f.shortcut, f.fork)


def _seq(node) -> int:
    if node is None:
        return _LEAF_SEQ
    if type(node).__name__ == "AccumulateGrad":
        return _LEAF_SEQ
    return node._sequence_nr()


def _node(t: Tensor):
    if not (isinstance(t, Tensor) and t.requires_grad):
        return None
    return get_gradient_edge(t).node


def counted(args: tuple, kwargs: dict) -> bool:
    """Whether an addition is one discovery and the watch count: two floating tensors of one shape.

    Gradients play no part, so a forward under ``no_grad`` counts the same additions.
    """
    if len(args) < 2 or kwargs.get("alpha", 1) != 1 or "out" in kwargs:
        return False
    a, b = args[0], args[1]
    return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape \
        and a.is_floating_point() and b.is_floating_point()


def walk(start, target, params: set) -> tuple[bool, bool, set, list, set]:
    """Whether ``start``'s graph reaches ``target``, whether through a parameter, and the branch.

    Only nodes made after ``target`` are visited (sequence numbers), and the
    walk stops at ``target``. Returns (reached, learned, the nodes on paths
    from start to target, the parameters met on the way, the nodes on those
    paths that a parameter feeds from the side).
    """
    floor = _seq(target)
    reach: dict = {}        # node -> reaches target
    learned: dict = {}      # node -> a path to target passes a node fed by a parameter
    fed: dict = {}          # node -> a parameter feeds it without reaching the target
    met: list = []
    stack = [(start, False)]
    while stack:
        n, done = stack.pop()
        if n in reach and not done:
            continue
        if n is target:
            reach[n], learned[n], fed[n] = True, False, False
            continue
        kids = [c for c, _ in n.next_functions if c is not None]
        if not done:
            reach[n] = False     # placeholder against revisits while open
            stack.append((n, True))
            for c in kids:
                if c in reach:
                    continue
                if type(c).__name__ == "AccumulateGrad":
                    is_param = c is not target and id(c.variable) in params
                    reach[c], learned[c], fed[c] = c is target, False, is_param
                    if is_param:
                        met.append(c.variable)
                elif _seq(c) < floor:
                    reach[c], learned[c], fed[c] = False, False, False
                else:
                    stack.append((c, False))
            continue
        r = any(reach[c] for c in kids)
        reach[n] = r
        fed[n] = any(fed[c] for c in kids)
        learned[n] = r and any(learned[c] if reach[c] else fed[c] for c in kids)
    if start not in reach:
        return False, False, set(), [], set()
    region = {n for n, r in reach.items() if r}
    fed_side = {n for n in region if n is not target
                and any(fed.get(c, False) and not reach.get(c, False) for c, _ in n.next_functions if c is not None)}
    ps, seen = [], set()
    for p in met:
        if id(p) not in seen:
            seen.add(id(p))
            ps.append(p)
    return reach[start], learned[start], region, ps, fed_side


class Discovery(TorchFunctionMode):
    """The discovery forward: sees every addition, judges it on the graph as it is made.

    Use as ``with Discovery(model) as d: model(x)``; then ``d.found``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.params = {id(p) for p in model.parameters() if p.requires_grad}
        self.found: list[Found] = []
        self._stack: list = []          # (path, call)
        self._inputs: list = []         # per stack level: (tensor, node) of its first input or None
        self._calls: dict = {}
        self._handles: list = []
        self._by_exit: dict = {}        # exit node -> Found not yet nested or merged
        self.events: list = []          # every counted addition, in order
        self.batch: Optional[int] = None    # the first dimension of the model's first input
        self._made: dict = {}           # graph node -> path of the innermost module that returned it

    def __enter__(self):
        for path, m in self.model.named_modules():
            if not path:
                continue        # the root: run() stands in for its call
            self._handles.append(m.register_forward_pre_hook(self._pre(path)))
            self._handles.append(m.register_forward_hook(self._post(path), always_call=True))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._by_exit.clear()
        return super().__exit__(*exc)

    def release(self) -> None:
        """Let go of the discovery forward's tensors and graph: what was found keeps only where and what."""
        for ev in self.events:
            ev.a = ev.b = ev.na = ev.nb = ev.y = ev.ny = ev.owner_input = None
        for f in self.found:
            f.x_node = None
        self._made.clear()

    def _pre(self, path):
        def hook(module, args):
            k = self._calls.get(path, 0)
            self._calls[path] = k + 1
            self._stack.append((path, k))
            x = next((a for a in args if isinstance(a, Tensor)), None)
            n = _node(x) if x is not None and x.is_floating_point() else None
            self._inputs.append((x, n) if n is not None else None)
        return hook

    def _post(self, path):
        def hook(module, args, out):
            if self._stack:
                self._stack.pop()
                self._inputs.pop()
            t = out if isinstance(out, Tensor) else (out[0] if isinstance(out, (tuple, list)) and out
                                                     and isinstance(out[0], Tensor) else None)
            n = _node(t) if t is not None else None
            if n is not None and n not in self._made:
                self._made[n] = path    # the innermost module that returned it
        return hook

    def run(self, *args, **kwargs):
        """The model's forward (its own hooks are left out: the tracer's would record it)."""
        x = next((a for a in args if isinstance(a, Tensor)), None)
        first = x if x is not None else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        self.batch = first.shape[0] if first is not None and first.dim() else None
        n = _node(x) if x is not None and x.is_floating_point() else None
        self._stack.append(("", 0))
        self._inputs.append((x, n) if n is not None else None)
        try:
            return self.model.forward(*args, **kwargs)
        finally:
            self._stack.clear()
            self._inputs.clear()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in ADDS or not counted(args, kwargs):
            return func(*args, **kwargs)
        a, b = args[0], args[1]
        na, nb = _node(a), _node(b)
        owner = next((i for i in reversed(self._inputs) if i is not None), None)
        ev = _Add(len(self.events), tuple(self._stack), a, b, na, nb, func in INPLACE, owner)
        self.events.append(ev)
        if na is None or nb is None or na is nb:
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        ev.y, ev.ny = out, _node(out)
        if ev.ny is not None:
            self._judge(ev)
        return out

    # -- what an addition is ---------------------------------------------------------

    def _judge(self, ev: _Add) -> None:
        # the operand made first is the candidate shortcut
        s = 0 if _seq(ev.na) <= _seq(ev.nb) else 1
        ns, nt = (ev.na, ev.nb) if s == 0 else (ev.nb, ev.na)
        reached, learned, region, ps, _ = walk(nt, ns, self.params)
        if reached:
            if learned:
                self._add(Found("unit", ev, ev, s, "operand", ns, ps, entry_shortcut=s), region)
            return
        # a learned branch of a unit's x_l added to that unit's sum: a parallel residual block
        for k, (nu, no) in enumerate(((ev.na, ev.nb), (ev.nb, ev.na))):
            u = self._by_exit.get(nu)
            if u is not None and u.kind in ("unit", "parallel") and u.fork == "operand":
                reached, learned, region, ps, _ = walk(no, u.x_node, self.params)
                if reached and learned:
                    del self._by_exit[nu]
                    u.kind, u.exit, u.shortcut = "parallel", ev, k
                    u.params += [p for p in ps if all(p is not q for q in u.params)]
                    self._nest(u, region)
                    self._by_exit[ev.ny] = u
                    return
        # both operands computed from the input of the module the addition happens in
        if ev.owner_input is None:
            return
        x, nx = ev.owner_input
        ra, _, ga, pa, fa = walk(ev.na, nx, self.params)
        rb, _, gb, pb, fb = walk(ev.nb, nx, self.params)
        if not (ra and rb) or (ga & gb) & (fa | fb):
            return      # not both from x, or they part after a learned step they share (two heads)
        # a side is learned by parameters of its own: q * cos + rotate(q) * sin shares q's
        own_a = [p for p in pa if all(p is not q for q in pb)]
        own_b = [p for p in pb if all(p is not q for q in pa)]
        if tuple(x.shape) != tuple(ev.y.shape) and (own_a or own_b):
            h = 0 if not own_a or (own_b and len(ga) <= len(gb)) else 1
            f = Found("projection", ev, ev, h, "input", nx, pb if h == 0 else pa)
        elif own_a and own_b:
            f = Found("sum", ev, ev, 0, "input", nx, pa + own_b)
        else:
            return      # one learned side and a parameter-free one of the same shape, or shared parameters
        self._add(f, ga | gb)

    def _add(self, f: Found, region: set) -> None:
        ev = f.exit
        f.made_by = self._made.get(ev.nb if f.shortcut == 0 else ev.na, "")
        self._nest(f, region)
        self.found.append(f)
        self._by_exit[f.exit.ny] = f

    def _nest(self, f: Found, region: set) -> None:
        """Earlier units and sums whose output lies inside ``f``'s branch become its sub-units."""
        for n in region:
            g = self._by_exit.get(n)
            if g is not None and g is not f and n is not f.x_node:
                g.parent = f
                del self._by_exit[n]


def name_found(found: list[Found]) -> None:
    """Give each found addition its name: module path, ``.call<k>``, ``.add<k>`` (see module doc).

    Units on the depth path and the rest (sub-units, sums) are counted apart, so a
    block with one unit is named by its path alone, whatever is nested in it.
    """
    calls: dict = {}
    per_call: dict = {}
    for f in found:
        path, call = f.exit.stack[-1] if f.exit.stack else ("", 0)
        calls.setdefault(path, set()).add(call)
        top = f.parent is None and f.kind != "sum"
        per_call.setdefault((path, call, top), []).append(f)
    for (path, call, top), fs in per_call.items():
        base = path
        if len(calls[path]) > 1:
            base = f"{path}.call{call}" if path else f"call{call}"
        # several in one call: named by the child module their branch came out of, where that
        # tells them apart (x + attn(ln1(x)), then + mlp(ln2(x)): .attn, .mlp), else numbered
        slots = [_child(path, f.made_by) for f in fs]
        if len(fs) > 1 and all(slots) and len(set(slots)) == len(slots):
            for f, slot in zip(fs, slots):
                f.name = f"{base}.{slot}" if base else slot
            continue
        for k, f in enumerate(fs):
            f.name = base if len(fs) == 1 else (f"{base}.add{k}" if base else f"add{k}")
    for f in found:
        if f.parent is not None:
            root = f.parent
            while root.parent is not None:
                root = root.parent
            f.note = f"inside the branch of {root.name}"


def _child(path: str, made_by: str) -> str:
    """The name of ``path``'s direct child that ``made_by`` lies in ("" if none)."""
    if not made_by or made_by == path:
        return ""
    if path:
        if not made_by.startswith(path + "."):
            return ""
        made_by = made_by[len(path) + 1:]
    return made_by.split(".", 1)[0]


def depth_units(found: list[Found]) -> list[Found]:
    """The found additions on the depth path: units (of any kind but sums) in no other's branch."""
    return [f for f in found if f.parent is None and f.kind != "sum"]
