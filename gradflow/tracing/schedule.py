"""When to record: schedules map a step number to yes or no (Cockpit's habit)."""
from __future__ import annotations

from typing import Callable, Iterable, Union

from gradflow.errors import GradflowError


class Schedule:
    """Base class: ``schedule(step) -> bool``. Steps count from 0."""

    def __call__(self, step: int) -> bool:
        raise NotImplementedError


class Every(Schedule):
    """Every ``n``-th step, starting at ``start``."""

    def __init__(self, n: int = 1, start: int = 0):
        if n < 1:
            raise GradflowError(f"every(n={n!r}): n must be >= 1")
        self.n, self.start = n, start

    def __call__(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.n == 0

    def __repr__(self) -> str:
        return f"every({self.n})"


class LogSpaced(Schedule):
    """Steps 0, 1, 2, ... at first, then about ``per_decade`` steps per factor of 10."""

    def __init__(self, per_decade: int = 10, until: int = 10**9):
        if per_decade < 1:
            raise GradflowError(f"log_spaced(per_decade={per_decade!r}): must be >= 1")
        pts = {0}
        k = 0.0
        while True:
            s = int(round(10 ** (k / per_decade))) - 1
            if s > until:
                break
            pts.add(s)
            k += 1
        self.steps = pts

    def __call__(self, step: int) -> bool:
        return step in self.steps

    def __repr__(self) -> str:
        return "log_spaced"


class At(Schedule):
    """Exactly the given steps."""

    def __init__(self, steps: Iterable[int]):
        self.steps = set(int(s) for s in steps)

    def __call__(self, step: int) -> bool:
        return step in self.steps


def every(n: int = 1, start: int = 0) -> Every:
    return Every(n, start)


def log_spaced(per_decade: int = 10, until: int = 10**9) -> LogSpaced:
    return LogSpaced(per_decade, until)


def at(steps: Iterable[int]) -> At:
    return At(steps)


def as_schedule(s: Union[None, int, Schedule, Callable[[int], bool]]) -> Callable[[int], bool]:
    """None: every step; an int n: every n-th step; else a callable step -> bool."""
    if s is None:
        return Every(1)
    if isinstance(s, int):
        return Every(s)
    if callable(s):
        return s
    raise GradflowError(f"schedule={s!r}: give an int n (every n steps), every(n), log_spaced() or at([...])")
