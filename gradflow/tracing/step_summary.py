"""``Tracer.summary()``: theory's fits of recorded tables, per step, as plain Python numbers.

Tracing does not import theory (theory sits above it): this module's function
imports :func:`gradflow.theory.summarize` when it is called, as the faces
layer would.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pandas as pd

from gradflow.errors import GradflowError


def plain(v: Any) -> Any:
    """numpy scalars and arrays inside dicts/lists -> Python numbers and lists."""
    if isinstance(v, dict):
        return {plain(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return [plain(x) for x in v.tolist()]
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def _one(units: pd.DataFrame, **kwargs) -> dict:
    from gradflow.theory import summarize
    body = units[units.get("phase", "train") == "train"] if "phase" in units else units
    if body.empty:
        body = units
    if "micro" in body and body[["step", "micro", "backward"]].drop_duplicates().shape[0] > \
            body["step"].nunique():
        # micro-batches (and backward passes) of one step are fitted together, each its own group
        key = body[["step", "micro", "backward"]].astype(str).agg("/".join, axis=1)
        body = body.assign(step=pd.factorize(key)[0])
    return plain(summarize(body, **kwargs))


def summarize_steps(units: pd.DataFrame, step: Optional[int] = None, pool: bool = False,
                    **kwargs) -> dict:
    """Per-step (or pooled) summaries of a units table; see :meth:`Tracer.summary`."""
    if units.empty:
        return {}
    steps = sorted(units["step"].unique())
    if step is not None:
        if step not in steps:
            raise GradflowError(f"summary(step={step!r}): no such recorded step; recorded: "
                                f"{[int(s) for s in steps[:10]]}{' ...' if len(steps) > 10 else ''}")
        return _one(units[units["step"] == step], **kwargs)
    if pool:
        out = _one(units, **kwargs)
        out["pooled_steps"] = len(steps)
        return out
    if len(steps) == 1:
        return _one(units, **kwargs)
    return {int(s): _one(units[units["step"] == s], **kwargs) for s in steps}


__all__ = ["summarize_steps", "plain"]
