"""Residual additions found in torch.fx graphs, and the parts they give.

Discovery traces the whole model once and keeps the modules in whose own code
a residual addition happens (an addition whose operands are computed from a
common input). Each such module is then traced alone, with every other unit
kept as a leaf, and each of its residual additions becomes one unit:

* x_l is the residual stream entering the addition: the operand that the other
  one is computed from (an identity shortcut), else the previous unit's output
  or the module's input when both operands descend from it, else their latest
  common ancestor;
* the shortcut side h is that operand (or, for ``a(x) + b(x)``, the operand
  with the shorter computation from x_l), the branch side r the other;
* the addition is replaced by ``run.add(k, x_l, h, r)``, and ``run.enter(k, x_l)``
  is called where x_l is made (see :mod:`gradflow.tracing.parts`), so a hand-written ``x + f(x)`` network, a pre-LN
  block with two additions or a ResNet block written by hand gets the
  direct/residual split with no declaration. Whatever follows the last
  addition (a ReLU, a post-LN LayerNorm) sits between units, and the direct
  term is carried through it exactly.

The parts are checked against the module's own forward on the first traced
call, like every other unit's. When torch.fx cannot trace the code, its reason
is kept and shown in the error that asks for a declaration.
"""
from __future__ import annotations

import operator
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn

from gradflow.tracing.parts import Block, Runner

ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = ("add", "add_")


def is_add(node) -> bool:
    """A plain two-tensor addition node (no ``alpha=``)."""
    if node.kwargs:
        return False
    return (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ADD_METHODS)


def _ancestors(graph) -> dict:
    """Each node's data ancestors. A tensor's shape, dtype or device is no data: what is computed
    from ``x.shape`` alone (a positional encoding of x's size) is not computed from x."""
    anc: dict = {}
    meta: set = set()       # nodes computed from tensors' metadata alone (sizes, and what is made of them)
    for node in graph.nodes:
        ins = node.all_input_nodes
        s: set = set()
        if _metadata(node) or (ins and all(a in meta for a in ins)):
            meta.add(node)
        else:
            for a in ins:
                if a not in meta:
                    s |= anc[a]
                    s.add(a)
        anc[node] = s
    return anc


_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout"}
_META_METHODS = {"size", "dim", "numel", "get_device", "element_size"}


def _metadata(node) -> bool:
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] in _META_ATTRS
    return node.op == "call_method" and node.target in _META_METHODS


def _operands(node):
    args = [a for a in node.args if isinstance(a, type(node))]
    return args if len(args) == 2 and len(node.args) == 2 else None


def residual_module_paths(model: nn.Module) -> tuple[list[str], str]:
    """Paths of the modules whose own code holds a residual addition, and fx's failure reason."""
    import torch.fx as fx
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as e:  # the reason goes into the "declare your units" error
        return [], f"{type(e).__name__}: {e}".strip()
    anc = _ancestors(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    placeholders = {n for n in graph.nodes if n.op == "placeholder"}
    params = {n for n in graph.nodes if n.op == "get_attr"}
    names: list[str] = []
    for node in graph.nodes:
        ops = _operands(node) if is_add(node) else None
        if ops is None:
            continue
        a, b = ops
        common = (anc[a] & anc[b]) - placeholders - params
        if a in anc[b] or b in anc[a] or common and _not_unit(model, anc, order, a, b, common) is None:
            stack = node.meta.get("nn_module_stack") or {}
            path = ""
            if stack:
                path = list(stack.values())[-1]
                path = path[0] if isinstance(path, tuple) else path
            if path not in names:
                names.append(path)
    return names, ""


class _UnitTracer:
    """torch.fx tracer that keeps other units (and torch.nn's own modules) as leaves."""

    def __new__(cls, leaves: set):
        import torch.fx as fx

        class T(fx.Tracer):
            def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
                return id(m) in leaves or super().is_leaf_module(m, qualname)
        return T()


def fx_block(module: nn.Module, leaves: set) -> tuple[Optional[Block], str]:
    """The :class:`Block` of a module from its own graph's residual additions, or (None, reason)."""
    import torch.fx as fx
    try:
        tracer = _UnitTracer(leaves - {id(module)})
        graph = tracer.trace(module)
        gm = fx.GraphModule(module, graph)
    except Exception as e:
        return None, f"torch.fx could not trace {type(module).__name__} alone: {type(e).__name__}: {e}"
    graph = gm.graph
    anc = _ancestors(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    params = {n for n in graph.nodes if n.op == "get_attr"}
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    stream = inputs[0] if inputs else None
    holder: dict[str, Any] = {}
    names: list[str] = []
    owned: list[tuple] = []
    found = []
    skipped: dict = {}          # why -> additions of two tensors from a common input that are not units
    for node in list(graph.nodes):
        ops = _operands(node) if is_add(node) else None
        if ops is None or (node.meta.get("nn_module_stack") or {}):
            continue   # additions inside child modules belong to them
        a, b = ops
        if a in anc[b]:
            x, h, r = a, a, b
        elif b in anc[a]:
            x, h, r = b, b, a
        else:
            common = (anc[a] & anc[b]) - params
            if not common:
                continue
            why = _not_unit(gm, anc, order, a, b, common)
            if why is not None:
                skipped.setdefault(why, []).append(node.name)
                continue
            if stream is not None and stream in common:
                x = stream
            else:
                x = max(common, key=order.__getitem__)
            own = anc[x] | {x}
            h, r = (a, b) if len(anc[a] - own) <= len(anc[b] - own) else (b, a)
        k = len(names)
        region = (anc[h] | anc[r] | {h, r}) - anc[x] - {x}
        names.append(_slot_name(r, anc, k))
        owned.append(_owned(gm, region))
        found.append((node, x, h, r, k))
        stream = node
    new_of: dict = {}
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1:]
    for node, x, h, r, k in found:      # rewrite after every decision: the ancestry is of the original graph
        with graph.inserting_after(node):
            new = graph.call_function(_adder(holder, k), tuple(new_of.get(v, v) for v in (x, h, r)))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        new_of[node] = new
        xk = new_of.get(x, x)           # run.enter(k, x_l) right where x_l is made, before any use
        with graph.inserting_after(last_input[0] if xk.op == "placeholder" and last_input else xk):
            graph.call_function(_enterer(holder, k), (xk,))
    key = (type(module).__qualname__, tuple((w, tuple(n)) for w, n in skipped.items()))
    if skipped and key not in _SAID:
        _SAID.add(key)
        said = "; ".join(f"{n} {w}" for w, n in skipped.items())
        warnings.warn(f"gradflow: in {type(module).__name__}'s code, additions of two tensors computed from "
                      f"a common input are not residual units and are not traced as units: {said}",
                      RuntimeWarning, stacklevel=2)
    if not names:
        return None, f"no residual addition in {type(module).__name__}'s own code"
    gm.recompile()

    def forward(run: Runner, *args: Any, **kwargs: Any):
        prev, holder["run"] = holder.get("run"), run
        try:
            return gm(*args, **kwargs)
        finally:
            holder["run"] = prev
    return Block(tuple(_unique(names)), forward, tuple(owned)), ""


_SAID: set = set()      # (class, additions) already said: once per process, not per instance

_SPLITS = {torch.split, torch.chunk, torch.tensor_split, torch.unbind, torch.Tensor.split,
           torch.Tensor.chunk, torch.Tensor.tensor_split, torch.Tensor.unbind}
_SPLIT_METHODS = {"split", "chunk", "tensor_split", "unbind", "split_with_sizes"}


def _not_unit(root, anc: dict, order: dict, a, b, common: set) -> "Optional[str]":
    """Why the addition a + b, neither computed from the other, is not a residual unit (None: it is one).

    Its input x_l would be the operands' latest common ancestor. That must be a tensor: when it is
    the tuple of a chunk()/split(), the operands are two pieces of one tensor (Res2Net's hierarchical
    sums). And some operand must be computed from x_l through a learned operation (a module with
    parameters, or a parameter): a sum of two parameter-free functions of x_l (a rotary embedding's
    x cos + rot(x) sin) is no residual branch.
    """
    x = max(common, key=order.__getitem__)
    if _is_tuple(x):
        return "add two pieces of one tensor split by chunk()/split()/unbind()"
    region = (anc[a] | anc[b] | {a, b}) - anc[x] - {x}
    if not any(_learned(root, n) for n in region):
        return "add two parameter-free functions of one tensor (no learned branch)"
    return None


def _learned(root, node) -> bool:
    if node.op == "get_attr":
        return isinstance(_getattr(root, str(node.target)), nn.Parameter)
    if node.op == "call_module":
        return any(True for _ in root.get_submodule(str(node.target)).parameters())
    return False


def _is_tuple(node) -> bool:
    """Whether a graph node makes a tuple of tensors (a split), not a tensor: no unit's input."""
    if node.op == "call_function" and node.target in _SPLITS:
        return True
    if node.op == "call_method" and node.target in _SPLIT_METHODS:
        return True
    users = list(node.users)
    return bool(users) and all(u.op == "call_function" and u.target is operator.getitem for u in users)


def _adder(holder: dict, k: int):
    def gradflow_residual_add(x, h, r):
        return holder["run"].add(k, x, h, r)
    gradflow_residual_add.__name__ = f"gradflow_residual_add_{k}"
    return gradflow_residual_add


def _enterer(holder: dict, k: int):
    def gradflow_unit_enter(x):
        holder["run"].enter(k, x)
    gradflow_unit_enter.__name__ = f"gradflow_unit_enter_{k}"
    return gradflow_unit_enter


def _slot_name(r, anc: dict, k: int) -> str:
    """A unit's name within its module: the child module that computes its branch's output, else add<k>."""
    node, seen = r, 0
    while node is not None and seen < 64:
        if node.op == "call_module":
            return str(node.target).split(".")[0]
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
        node = max(inputs, key=lambda a: len(anc[a]), default=None)
        seen += 1
    return f"add{k}"


def _owned(gm, region: set) -> tuple:
    """The modules and parameters a unit's region of the graph uses."""
    out: list = []
    for n in region:
        if n.op == "call_module":
            out.append(gm.get_submodule(str(n.target)))
        elif n.op == "get_attr":
            t = _getattr(gm, str(n.target))
            if isinstance(t, nn.Parameter):
                out.append(t)
    return tuple(out)


def _getattr(root, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _unique(names: list[str]) -> list[str]:
    seen: dict = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 and names.count(n) == 1 else f"{n}{seen[n] - 1}")
    return out
