"""``gradflow.units(model)``: a short table of the residual units found, like torchinfo's.

One line per unit: name, kind, stage, how it was found (``zoo`` for the unit
protocol, ``adapter``, ``declared``, ``fx``, ``run`` for seen as the network
ran), its role (``depth``: a unit of the depth sequence; ``sub-unit``: a
residual addition inside another unit's branch; ``sum``: a parallel branch
sum with no identity operand), whether the direct/residual split is available
(and why not), and the input shape once the model has run (give
``example=`` to run it once, under ``no_grad``, in its current mode, with its
buffers and the random stream left as they were). No module reprs.
"""
from __future__ import annotations

from typing import Any, Optional

import pandas as pd
import torch
import torch.nn as nn

from gradflow.errors import GradflowError

COLUMNS = ("name", "kind", "stage", "found", "role", "split", "x_shape")


class UnitList(list):
    """The units found (a list of :class:`~gradflow.tracing.UnitInfo`) that prints as a table."""

    def frame(self) -> pd.DataFrame:
        """The table as a DataFrame."""
        return pd.DataFrame([_row(u) for u in self], columns=list(COLUMNS) + ["note"])

    def __str__(self) -> str:
        return unit_table(self)

    __repr__ = __str__


def _row(u) -> dict:
    return dict(name=u.name, kind=_short(u.kind), stage=u.stage, found=u.found, role=u.role,
                split="yes" if u.split else "no", x_shape=u.x_shape or "?", note=u.note)


def _short(kind: str) -> str:
    for prefix in ("torchvision.models.", "timm.models.", "transformers.models."):
        if kind.startswith(prefix):
            return kind[len(prefix):]
    return kind


def _call_args(example: Any) -> tuple:
    if isinstance(example, tuple):
        return example, {}
    if isinstance(example, dict):
        return (), dict(example)
    return (example,), {}


def unit_table(units) -> str:
    """The units as a fixed-width text table (with the reason wherever a split is missing)."""
    rows = [_row(u) for u in units]
    head = {c: c for c in COLUMNS}
    width = {c: max(len(str(r[c])) for r in rows + [head]) for c in COLUMNS}
    line = "  ".join(f"{c:<{width[c]}}" for c in COLUMNS)
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(f"{str(r[c]):<{width[c]}}" for c in COLUMNS).rstrip())
    notes = sorted({r["note"] for r in rows if r["note"]})
    out += [f"note: {n}" for n in notes]
    splits = sum(1 for r in rows if r["split"] == "yes")
    depth = sum(1 for r in rows if r["role"] == "depth")
    extra = f" ({depth} on the depth path)" if depth != len(rows) else ""
    out.append(f"{len(rows)} units{extra}, {splits} with the direct/residual split")
    return "\n".join(out)


def units(model: nn.Module, example: Optional[Any] = None, units: Any = None, parts: Any = None) -> UnitList:
    """The residual units of ``model`` as a printable table.

    Args:
        model: any network.
        example: an input (a tensor, a tuple of positional arguments or a dict
            of keyword arguments) to run once under ``no_grad`` so the input
            shapes and shape-based stages are known (and, for a network whose
            units are found as it runs, the units themselves: that one forward
            has gradients on); the model's buffers and the RNG are left as they were.
        units: as for :func:`gradflow.trace`.
        parts: as for :func:`gradflow.trace`.
    Returns:
        A :class:`UnitList` (``print`` it; ``.frame()`` for a DataFrame).
    """
    from gradflow.tracing.recorder import Tracer
    tr = Tracer(model, units=units, parts=parts, split=False, quantities=("cheap",), check=False)
    if example is not None:
        from gradflow.utils.state import untouched
        args, kwargs = _call_args(example)
        dev = next((a.device for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)),
                   torch.device("cpu"))
        with untouched(model, dev), torch.no_grad(), tr:
            model(*args, **kwargs)
    if tr._watch is not None:
        if example is None:
            raise GradflowError(
                f"the units of {type(model).__name__} are found as it runs (no block is known by class "
                "and none is declared): give example= (an input to run once)")
        return UnitList(tr._watch.listed)
    return UnitList(tr.infos)
