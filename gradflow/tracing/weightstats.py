"""The tracer's weight statistics: each unit's weight quantities once per step, and the update's size.

:class:`WeightStats` owns what the weight and update quantities need between the
hooks that feed it: the reductions of the current step and, when an optimizer is
traced, a copy of the weights taken just before ``optimizer.step()`` (the
update quantities compare it with the weights after). The tracer calls it from
its optimizer hooks (:meth:`before_update`, :meth:`after_update`) or, without an
optimizer, at the end of each backward pass (:meth:`measure`); the table writer
reads :attr:`step_stats`.
"""
from __future__ import annotations

from typing import Optional, Sequence

from gradflow.tracing.quantities import Weights


class WeightStats:
    """Weight and update quantities of the traced units, per step.

    Args:
        quantities: the tracer's quantities; those with ``needs == "weights"`` are
            measured once per step, those with ``needs == "update"`` around the
            optimizer's update (only when ``optimizer_traced``).
        optimizer_traced: whether a step is one ``optimizer.step()``.
    """

    def __init__(self, quantities: Sequence, optimizer_traced: bool):
        self.weight_quantities = [q for q in quantities if q.needs == "weights"]
        self.update_quantities = [q for q in quantities if q.needs == "update"] if optimizer_traced else []
        self.step_stats: dict = {}   # optimizer mode: id(info) -> weight reductions of this step
        self.updated = False         # the optimizer's update ran this step
        self._before: dict = {}      # id(param) -> its value before the update

    def reset(self) -> None:
        """A new step: nothing measured, nothing updated."""
        self.step_stats, self._before, self.updated = {}, {}, False

    def measure(self, groups: Sequence, step: int, quantities: Optional[Sequence] = None,
                before: Optional[dict] = None) -> dict:
        """id(info) -> the quantities of each unit; each quantity sees all units at once.

        Args:
            groups: the tracer's unit groups (``infos`` and ``params`` side by side).
            step: the step being recorded.
            quantities: which to compute (default: the weight quantities).
            before: id(param) -> its value before the update, for the update quantities.
        """
        qs = self.weight_quantities if quantities is None else quantities
        ts = [Weights(ps, step, info, [before[id(p)] for p in ps] if before is not None else None)
              for g in groups for info, ps in zip(g.infos, g.params) if ps is not None]
        out: dict = {id(t.info): {} for t in ts}
        for q in qs:
            if q.should_compute(step):
                for t, st in zip(ts, q.weights_all(ts)):
                    out[id(t.info)].update(st)
        return out

    def before_update(self, groups: Sequence, step: int) -> None:
        """Just before ``optimizer.step()``: the weight quantities, and a copy of the weights."""
        self.step_stats = self.measure(groups, step)
        if self.update_quantities:
            self._before = {id(p): p.detach().clone() for g in groups for ps in g.params for p in ps or ()}

    def after_update(self, groups: Sequence, step: int) -> None:
        """Just after it: the update quantities against the copy, which is then dropped."""
        self.updated = True
        if self._before:
            upd = self.measure(groups, step, self.update_quantities, self._before)
            for k, v in upd.items():
                self.step_stats.setdefault(k, {}).update(v)
            self._before = {}
