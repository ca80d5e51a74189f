"""What a recorded step holds: unit calls (micro-batches) and the backward passes that reached them.

A *step* is what the user trains with: one optimizer update when the tracer
was given an optimizer (every forward inside it is a micro-batch, numbered in
the ``micro`` column), else one forward call of the model. Each forward call
of the model opens a :class:`Micro`; every unit called inside it appends a
:class:`Call`. Each backward pass that reaches a micro-batch's units is one
pass, numbered in the ``backward`` column (``retain_graph=True`` and a second
backward gives a second set of rows, each exact for its own loss). Forwards
with gradients disabled are ``phase="eval"`` rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor


@dataclass
class Call:
    """One call of one unit in one micro-batch: reductions (device tensors) and graph edges."""

    info: Any
    index: int
    micro: "Micro"
    module: Any = None
    parts: Any = None
    args: tuple = ()
    fwd: dict = field(default_factory=dict)       # per-sample forward reductions, [B] each
    scalars: dict = field(default_factory=dict)   # one-number forward reductions (0-d)
    entry: Any = None                             # the _Entry its input was taken in with, until used
    bwd: dict = field(default_factory=dict)       # pass -> per-sample backward reductions
    expects_grad: bool = False
    x_edge: Any = None
    out_edge: Any = None
    y_edge: Any = None
    h_edge: Any = None
    coef: Any = 1.0
    has_post: bool = False
    identity_shortcut: bool = True
    direct: Optional[Tensor] = None     # direct term at this unit's input, while pending
    ref: Optional[Tensor] = None        # the same with every h-coefficient set to 1
    link_edges: Optional[tuple] = None  # (x_edge, previous out_edge) when ops sit between units
    direct_norm: Optional[Tensor] = None  # its per-sample norm, when already known
    # direct = exp(direct_log_scale) * direct: deep products underflow float32
    direct_log_scale: Any = 0.0
    ref_log_scale: Any = 0.0            # the same for ref
    carries: int = 0                    # changed carries since the last rescale
    x_shape: str = ""
    out_shape: str = ""


@dataclass
class Micro:
    """One forward call of the model (a micro-batch of its step) and what reached it since."""

    step: int
    micro: int
    phase: str                                    # "train" (grad enabled) or "eval"
    calls: list = field(default_factory=list)
    top: dict = field(default_factory=dict)       # pass -> per-sample ||dE/dx_L||
    top_fwd: dict = field(default_factory=dict)   # forward reductions of x_L
    last_out: Any = None                          # x_L so far: the last unit's output
    entries: dict = field(default_factory=dict)   # id(x) -> _Entry of inputs entered, not yet claimed
    top_handle: Any = None
    top_pending: Any = None                       # (call, its output) to hook when the forward ends
    passes: dict = field(default_factory=dict)    # backward id -> pass number
    done: list = field(default_factory=list)      # passes whose backward finished
    weights: dict = field(default_factory=dict)   # pass -> {id(info): {name: 0-d tensor}}
    scale: dict = field(default_factory=dict)     # pass -> GradScaler scale used
    expects_grad: bool = False
    final: bool = False
    skipped: bool = False                         # the optimizer skipped this step's update

    @property
    def complete(self) -> bool:
        """Every gradient it waits for has arrived at least once (or it waits for none)."""
        return bool(self.done) or not self.expects_grad


class _Entry:
    """A unit's input as it came in: its early reductions, its gradient hook and graph edge.

    Taken before the unit runs, so a unit that changes its input in place is still
    measured (x_l, dE/dx_l and the split's edge) at the tensor it was given. ``cell``
    holds the call the hook reports to, once a unit claims the entry.
    """

    __slots__ = ("x", "version", "fwd", "scalars", "cell", "edge", "kept")

    def __init__(self, x: Tensor, version: int):
        self.x, self.version = x, version
        self.fwd: dict = {}
        self.scalars: dict = {}
        self.cell: Optional[list] = None
        self.edge: Any = None
        self.kept: Optional[Tensor] = None      # keep=("x",): a copy as it came in
