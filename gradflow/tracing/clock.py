"""The tracer's step bookkeeping: which step is open, whether it is recorded, its micro-batches.

:class:`StepClock` owns the state that says where a traced run is: the step
index, whether the schedule records it, the micro-batch now running, the ones
recorded and not yet written, and how many train and eval micro-batches the step
has seen. The tracer decides *when* a step or a micro-batch begins (a forward
of the model, ``new_micro()``, ``optimizer.step()``); the clock keeps the count
and says which micro-batches are ready to be written.
"""
from __future__ import annotations

from typing import Callable, Optional

from gradflow.tracing.records import Micro


class StepClock:
    """Steps and micro-batches of one tracer.

    Args:
        schedule: step -> whether to record it.
        max_pending: how many incomplete micro-batches may wait before the oldest
            are written as they are.
    """

    def __init__(self, schedule: Callable[[int], bool], max_pending: int):
        self.schedule = schedule
        self.max_pending = max_pending
        self.step = -1                        # index of the current step
        self.recording = False                # whether the schedule records it
        self.micro: Optional[Micro] = None    # the micro-batch now running
        self.fresh: Optional[Micro] = None    # opened by new_micro(), not yet joined by a forward
        self.open: list[Micro] = []           # recorded micro-batches not written yet
        self.n_train = self.n_eval = 0        # micro-batches of this step so far, per phase

    def begin(self, step: int) -> None:
        """Step ``step`` begins: recorded or not by the schedule, no micro-batch yet."""
        self.step = step
        self.recording = bool(self.schedule(step))
        self.n_train = self.n_eval = 0

    def new_micro(self, train: bool) -> Micro:
        """The next micro-batch of the current step (kept for writing when the step is recorded)."""
        phase = "train" if train else "eval"
        if train:
            n, self.n_train = self.n_train, self.n_train + 1
        else:
            n, self.n_eval = self.n_eval, self.n_eval + 1
        self.micro = Micro(self.step, n, phase)
        if self.recording:
            self.open.append(self.micro)
        return self.micro

    def ready(self, per_forward: bool) -> list[Micro]:
        """The open micro-batches to write now.

        Args:
            per_forward: a step is one forward (no optimizer traced): complete
                micro-batches are ready; otherwise only eval ones (a train step
                ends at the optimizer's update). Beyond ``max_pending`` waiting,
                the oldest are ready as they are.
        """
        ready = [m for m in self.open if (m.complete if per_forward else m.phase == "eval")]
        waiting = [m for m in self.open if m not in ready]
        if len(waiting) > self.max_pending:
            ready += waiting[:len(waiting) - self.max_pending]
        return ready

    def of_step(self) -> list[Micro]:
        """The open micro-batches of the current step."""
        return [m for m in self.open if m.step == self.step]
