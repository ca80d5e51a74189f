"""Vector-Jacobian products of many cotangents at once, from a recorded graph's saved tensors.

The path-length split (:mod:`gradflow.tracing.paths.carrier`) pushes a stack of M
cotangents (one per path length) through every unit. Through
``torch.autograd.grad`` that is M calls (or a vmap'ed call, slower on the CPU).
This module reads the graph between a unit's tensors, node by node
(``ConvolutionBackward0``, ``NativeBatchNormBackward0``, ``ReluBackward0``,
``AddBackward0``, ...), and applies each node's vector-Jacobian product to all
M cotangents at once, folded into the batch dimension (M x B rows): one
convolution per conv, BatchNorm's batch statistics reduced per entry. It uses
the tensors the forward saved (nothing is recomputed) and computes no weight
gradients.

:func:`compile_vjp` returns a :class:`Program`, or the reason it cannot
(``str``): a node without a rule here, a graph that leaves the unit. The
caller then takes the generic route through ``torch.autograd.grad`` and says
so (``vjp`` column of :func:`gradflow.tracing.paths.components.path_components`' units table).
"""
from __future__ import annotations

from typing import Any, Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor

_MAX_NODES = 256          # a unit's graph is small; more means the walk left the unit


class _Unsupported(Exception):
    pass


def _key(node) -> int:
    return id(node)


class Program:
    """The vector-Jacobian product from some output edges of a graph to some input edges, batched.

    ``run(grads)``: ``grads[i]`` is a stack ``[M, *outputs[i].shape]``; returns, per input, the
    stack ``[M, *inputs[j].shape]`` (None where no output depends on that input).
    """

    def __init__(self, order: list, outs: list, ins: list, nexts: dict, rules: dict, n_nodes: int,
                 reached: list):
        self.order, self.outs, self.ins, self.nexts, self.rules = order, outs, ins, nexts, rules
        self.n_nodes = n_nodes
        self.reached = reached      # per input: whether any output depends on it

    @torch.no_grad()
    def run(self, grads: list) -> list:
        m = grads[0].shape[0]
        acc: dict = {}
        # storages a rule must not write into: the caller's, and any handed to two consumers
        shared = {g.untyped_storage().data_ptr() for g in grads}

        def add(key, g):
            prev = acc.get(key)
            acc[key] = g if prev is None else prev + g

        for (node, nr), g in zip(self.outs, grads):
            add((_key(node), nr), g.reshape(m * g.shape[1], *g.shape[2:]) if g.ndim > 1 else g)
        for node in self.order:
            g = acc.pop((_key(node), 0), None)
            if g is None:
                continue
            outs = self.rules[_key(node)](g, m, g.untyped_storage().data_ptr() not in shared)
            sent = [go for (nxt, _), go in zip(node.next_functions, outs)
                    if go is not None and nxt is not None and _key(nxt) in self.nexts]
            if len(sent) > 1:
                shared.update(go.untyped_storage().data_ptr() for go in sent)
            for (nxt, nr), go in zip(node.next_functions, outs):
                if go is not None and nxt is not None and _key(nxt) in self.nexts:
                    add((_key(nxt), nr), go)
        res = []
        for node, nr in self.ins:
            g = acc.get((_key(node), nr))
            res.append(None if g is None else g.reshape(m, -1, *g.shape[1:]))
        return res


def compile_vjp(outputs: list, inputs: list, channels_last: bool = False) -> Union[Program, str]:
    """A :class:`Program` from output edges to input edges (``get_gradient_edge``), or why not.

    Args:
        outputs, inputs: gradient edges ``(node, output_nr)``.
        channels_last: run 4-d convolutions and the elementwise steps around them in
            ``torch.channels_last`` (saved tensors converted once; much faster on the CPU).
    Returns:
        The program, or a short reason (str) why this graph needs ``torch.autograd.grad``.
    """
    outputs = [(e.node, e.output_nr) for e in outputs]
    inputs = [(e.node, e.output_nr) for e in inputs]
    stops = {(_key(n), nr) for n, nr in inputs}
    stop_nodes = {_key(n) for n, _ in inputs}
    reach: dict = {}      # node key -> reaches an input
    nodes: dict = {}
    count = [0]

    def visit(node) -> bool:
        k = _key(node)
        if k in reach:
            return reach[k]
        count[0] += 1
        if count[0] > _MAX_NODES:
            raise _Unsupported(f"more than {_MAX_NODES} nodes between the unit's tensors")
        nodes[k] = node
        if k in stop_nodes:
            reach[k] = True
            return True   # an input: not expanded (its own inputs lie outside the unit)
        reach[k] = False
        r = False
        for nxt, _ in node.next_functions:
            if nxt is not None and visit(nxt):
                r = True
        reach[k] = r
        return r

    try:
        for n, _ in outputs:
            if n is None:
                raise _Unsupported("an output without a gradient edge")
            visit(n)
        live = {k for k, v in reach.items() if v and k not in stop_nodes}
        for n, nr in outputs:
            if _key(n) in stop_nodes and (_key(n), nr) not in stops:
                raise _Unsupported("an output is another output of an input's node")
            if _key(n) in live and nr != 0:
                raise _Unsupported(f"{type(n).__name__} with a gradient at its output {nr}")
        # topological order of the live nodes (Kahn), every consumer before its producers
        indeg = {k: 0 for k in live}
        for k in live:
            for nxt, nr in nodes[k].next_functions:
                if nxt is not None and _key(nxt) in live:
                    if nr != 0:
                        raise _Unsupported(f"{type(nxt).__name__} with a gradient at its output {nr}")
                    indeg[_key(nxt)] += 1
        ready = [k for k in live if indeg[k] == 0]
        order = []
        while ready:
            k = ready.pop()
            order.append(nodes[k])
            for nxt, _ in nodes[k].next_functions:
                if nxt is not None and _key(nxt) in live:
                    indeg[_key(nxt)] -= 1
                    if indeg[_key(nxt)] == 0:
                        ready.append(_key(nxt))
        for node in order:     # autograd sums a broadcast operand's gradient down; these rules do not
            if type(node).__name__ in _SAME_SHAPE:
                shape = _out_shape(node, 0)
                for nxt, nr in node.next_functions:
                    if nxt is not None and _key(nxt) in (live | stop_nodes) and _out_shape(nxt, nr) != shape:
                        raise _Unsupported(f"{type(node).__name__} with a broadcast operand")
        rules = {}
        for node in order:
            rules[_key(node)] = _rule(node, {_key(n) for n in [nx for nx, _ in node.next_functions
                                                               if nx is not None]} & (live | stop_nodes),
                                      channels_last)
        nexts = {k: True for k in live | stop_nodes}
        return Program(order, list(outputs), list(inputs), nexts, rules, len(live),
                       [_key(n) in nodes for n, _ in inputs])
    except _Unsupported as e:
        return str(e)


def _out_shape(node, nr: int) -> tuple:
    """The shape of the forward tensor whose gradient arrives at ``node``'s input ``nr``."""
    try:
        return tuple(node._input_metadata[nr].shape)
    except (AttributeError, IndexError, RuntimeError) as e:
        raise _Unsupported(f"no shape metadata on {type(node).__name__} ({e})") from e


# --- rules: one node's vector-Jacobian product on folded cotangents [M*B, ...] --------------------

Rule = Callable[[Tensor, int], list]


def _rule(node, needed: set, channels_last: bool) -> Rule:
    name = type(node).__name__
    make = _RULES.get(name)
    if make is None:
        raise _Unsupported(f"no batched rule for {name}")
    need = [nx is not None and _key(nx) in needed for nx, _ in node.next_functions]
    return make(node, need, channels_last) if make in _LAYOUT_AWARE else make(node, need)


def _fmt(t: Tensor, channels_last: bool) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


def _add_rule(node, need):
    alpha = getattr(node, "_saved_alpha", 1)
    a = float(alpha) if not isinstance(alpha, Tensor) else alpha

    def f(g, m, own=False):
        return [g if need[0] else None, (g if a == 1 else g * a) if need[1] else None]
    return f


def _sub_rule(node, need):
    alpha = getattr(node, "_saved_alpha", 1)

    def f(g, m, own=False):
        return [g if need[0] else None, (-g if alpha == 1 else g * (-alpha)) if need[1] else None]
    return f


def _mul_rule(node, need):
    """A product with a constant scalar (lambda h, mu F); tensor factors (gates) need autograd."""
    saved = []
    for i, attr in ((0, "_saved_other"), (1, "_saved_self")):
        t = getattr(node, attr, None) if need[i] else None
        if need[i] and not (isinstance(t, Tensor) and t.dim() == 0):
            raise _Unsupported("MulBackward0 with a tensor factor")
        saved.append(t)

    def f(g, m, own=False):
        return [None if t is None else g * t.to(g.dtype) for t in saved]
    return f


def _view_rule(node, need):
    size = tuple(node._saved_self_sym_sizes)

    def f(g, m, own=False):
        return [g.reshape(m * size[0], *size[1:]) if need[0] else None]
    if not size:
        raise _Unsupported("a view of a 0-d tensor")
    return f


def _pass_rule(node, need):
    return lambda g, m, own=False: [g if need[0] else None]


def _masked(g: Tensor, m: int, mask: Tensor, own: bool) -> Tensor:
    """g [M*B, ...] times a mask [B, ...] broadcast over the M entries (in place when g is ours)."""
    ge = g.reshape(m, *mask.shape)
    return (ge.mul_(mask) if own and ge.data_ptr() == g.data_ptr() else ge * mask).view(g.shape)


def _mask(t: Tensor, threshold, cl: bool) -> Tensor:
    """(t > threshold) as t's dtype (a float mask multiplies 3-4x faster than a bool one), written
    straight into channels_last when asked (one pass over t, not three)."""
    if cl and t.dim() == 4:
        b = torch.empty(t.shape, dtype=torch.bool, device=t.device, memory_format=torch.channels_last)
        return torch.gt(t, threshold, out=b).to(t.dtype)
    return (t > threshold).to(t.dtype)


def _relu_rule(node, need, cl=False):
    mask = _mask(node._saved_result, 0, cl)

    def f(g, m, own=False):
        return [_masked(g, m, mask, own) if need[0] else None]
    return f


def _threshold_rule(node, need, cl=False):
    mask = _mask(node._saved_self, node._saved_threshold, cl)

    def f(g, m, own=False):
        return [_masked(g, m, mask, own) if need[0] else None]
    return f


def _bn_rule(node, need, cl=False):
    x = node._saved_input
    w = node._saved_weight
    c = x.shape[1]
    shape = (1, c) + (1,) * (x.dim() - 2)
    if node._saved_training:
        mean, invstd = node._saved_result1, node._saved_result2
        if mean.numel() != c or invstd.numel() != c:
            raise _Unsupported("BatchNorm without saved batch statistics")
        xin, eps = _fmt(x, cl), node._saved_eps

        def f(g, m, own=False):
            # per entry, ATen's own fused kernel (the batch statistics are per entry)
            if not need[0]:
                return [None, None, None]
            ge = g.reshape(m, *x.shape)
            outs = [torch.ops.aten.native_batch_norm_backward(ge[i], xin, w, None, None, mean, invstd, True, eps,
                                                              [True, False, False])[0] for i in range(m)]
            return [outs[0] if m == 1 else torch.cat(outs), None, None]
        return f
    var = node._saved_running_var
    if var is None:
        raise _Unsupported("BatchNorm in eval mode without running statistics")
    scale = torch.rsqrt(var + node._saved_eps)
    if w is not None:
        scale = scale * w
    sc = scale.view(shape)

    def f(g, m, own=False):
        return [(g.mul_(sc) if own else g * sc) if need[0] else None, None, None]
    return f


def _conv_rule(node, need, cl=False):
    w = node._saved_weight
    x = node._saved_input
    stride, padding, dilation = tuple(node._saved_stride), tuple(node._saved_padding), tuple(node._saved_dilation)
    groups, transposed = node._saved_groups, node._saved_transposed
    if transposed:
        raise _Unsupported("transposed convolution")
    in_shape = tuple(x.shape[1:])
    k = tuple(w.shape[2:])
    # stride 1, no dilation, no groups, 'same'-or-less padding: a plain convolution with the
    # flipped, transposed kernel (faster than convolution_backward on the CPU)
    plain = (all(s == 1 for s in stride) and all(d == 1 for d in dilation) and groups == 1
             and w.dim() == 4 and all(p <= kk - 1 for p, kk in zip(padding, k)))
    if plain:
        wt = w.detach().flip(2, 3).transpose(0, 1).contiguous()
        pad = tuple(kk - 1 - p for p, kk in zip(padding, k))

    def f(g, m, own=False):
        if not need[0]:
            return [None, None, None]
        g = _fmt(g, cl)
        if plain:
            return [F.conv2d(g, wt, padding=pad), None, None]
        inp = g.new_empty(1).expand(g.shape[0], *in_shape)
        return [torch.ops.aten.convolution_backward(g, inp, w, None, stride, padding, dilation, False,
                                                    [0] * len(stride), groups, (True, False, False))[0],
                None, None]
    return f


_RULES: dict[str, Callable[[Any, list], Rule]] = {
    "AddBackward0": _add_rule, "SubBackward0": _sub_rule, "MulBackward0": _mul_rule,
    "ViewBackward0": _view_rule, "AliasBackward0": _pass_rule, "CloneBackward0": _pass_rule,
    "ReluBackward0": _relu_rule, "ReluBackward1": _relu_rule, "ThresholdBackward0": _threshold_rule,
    "ThresholdBackward1": _threshold_rule, "NativeBatchNormBackward0": _bn_rule,
    "ConvolutionBackward0": _conv_rule,
}
_LAYOUT_AWARE = {_relu_rule, _threshold_rule, _bn_rule, _conv_rule}
_SAME_SHAPE = {"AddBackward0", "SubBackward0", "MulBackward0", "AliasBackward0", "CloneBackward0", "ReluBackward0",
               "ReluBackward1", "ThresholdBackward0", "ThresholdBackward1", "NativeBatchNormBackward0"}
