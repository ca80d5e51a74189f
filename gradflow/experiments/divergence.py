"""Whether a run diverged, read from its log and status: a NaN/Inf loss, or a loss spike it never
recovered from.

The trainer stops a run whose loss or weights become NaN/Inf (status ``diverged``). A run can also
diverge without a NaN: its loss jumps after the warm-up and stays at the level of a network that
predicts nothing (ln C for C classes), so it ends at chance error with status ``ok`` or ``fail``.
Both are flagged here, so a table never reports such a row as a network that trained badly.

A *spike*: a logged training loss above ``factor`` x the lowest loss logged before it and above
the chance loss ln C, after the run had got below ``learned`` x ln C (it had learned something).
The run *diverged* if it never came back: its last logged loss is above ``stuck`` x ln C. A spike
it recovered from is reported as a note, not a divergence. A loss above ``EXPLODED`` x ln C (the
laptop dropout-shortcut row reached 3.9e10 without a NaN) is a divergence whatever came before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

SPIKE_FACTOR = 1.5     # a loss 1.5x the best so far, above chance level: a spike
LEARNED = 0.9          # the run had learned: its loss went below 0.9 ln C before the spike
STUCK = 0.9            # its last loss is above 0.9 ln C: it never recovered
EXPLODED = 100.0       # a loss over 100 ln C (230 on CIFAR-10): the weights blew up, learned before or not


@dataclass(frozen=True)
class Divergence:
    """What a run's log says: ``kind`` "nan", "spike", "status" or None; ``recovered`` spikes are notes."""

    diverged: bool
    kind: Optional[str] = None
    iteration: Optional[int] = None
    text: str = ""

    @property
    def short(self) -> str:
        return self.text if self.diverged else ""


def chance_loss(classes: int) -> float:
    """Cross-entropy of a uniform prediction over ``classes``: ln C (2.30 for CIFAR-10)."""
    return math.log(classes)


def divergence(log: pd.DataFrame, classes: int = 10, status: Optional[dict] = None,
               factor: float = SPIKE_FACTOR) -> Divergence:
    """Read a run's log (``iteration``, ``train_loss``) and status for a divergence.

    Args:
        log: one row per log point (``gradflow.runs.read.read_log_table``).
        classes: the dataset's classes (10 or 100): sets the chance loss ln C.
        status: the run's ``status.json`` (``{"status": "diverged", "message": ...}``), if any.
        factor: how many times the best loss so far a spike must reach.
    Returns:
        :class:`Divergence`.
    """
    status = status or {}
    if "train_loss" in log and "iteration" in log and len(log):
        it = log["iteration"].to_numpy()
        loss = pd.to_numeric(log["train_loss"], errors="coerce").to_numpy(float)
        # Inf anywhere; NaN (a JSON NaN and a missing value read alike) from a row on to the end,
        # after a finite loss: the run ended on it (a row without a loss in between is not a NaN)
        fin = np.isfinite(loss)
        tail_nan = np.isnan(loss) & (np.cumsum(fin[::-1])[::-1] == 0) & (np.cumsum(fin) > 0)
        bad = np.isinf(loss) | tail_nan
        if bad.any():
            i = int(np.argmax(bad))
            return Divergence(True, "nan", int(it[i]), f"diverged: the loss became NaN/Inf at iteration {int(it[i])}")
    else:
        it, loss = np.zeros(0, int), np.zeros(0)
    if status.get("status") == "diverged":
        msg = str(status.get("message", "")).split(";")[0]
        return Divergence(True, "status", None, f"diverged ({msg or 'status diverged'})")
    ok = np.isfinite(loss)
    it, loss = it[ok], loss[ok]
    if len(loss) < 2:
        return Divergence(False)
    chance = chance_loss(classes)
    blown = loss > EXPLODED * chance    # no network that predicts anything has such a loss
    if blown.any():
        i = int(np.argmax(blown))
        return Divergence(True, "exploded", int(it[i]), f"diverged: the loss exploded at iteration {int(it[i])} "
                          f"({loss[i]:.3g}, over {EXPLODED:g} ln {classes} = {EXPLODED * chance:.0f}; "
                          f"peak {loss.max():.3g}), whether or not it came back")
    best = np.minimum.accumulate(loss)
    prior = np.concatenate([[np.inf], best[:-1]])          # the best loss before each row
    spikes = (loss > factor * prior) & (loss > chance) & (prior < LEARNED * chance)
    if not spikes.any():
        return Divergence(False)
    i = int(np.argmax(spikes))
    what = (f"loss spike at iteration {int(it[i])} ({loss[i]:.2f}, {loss[i] / prior[i]:.1f}x the best "
            f"{prior[i]:.2f} before it)")
    if loss[-1] > STUCK * chance:
        return Divergence(True, "spike", int(it[i]), f"diverged: {what}, then never back below "
                          f"{STUCK:g} ln {classes} = {STUCK * chance:.2f} (last {loss[-1]:.2f})")
    return Divergence(False, "spike", int(it[i]), f"{what}, recovered (last loss {loss[-1]:.2f})")
