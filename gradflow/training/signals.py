"""SIGINT/SIGTERM during training: the first one stops the run at the next step with a checkpoint.

A second signal stops at once (``Interrupted``), except while a file is being
written: then it waits until the write is done, so a double Ctrl-C or two
SIGTERMs in a row never leave half a checkpoint or half a log line.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator, Optional


_received: list = []   # every signal a run has taken, in this process


def exit_on_signals() -> None:
    """For a CLI process (not a library call): SIGINT/SIGTERM outside a run exit 130/143 at once.

    A signal that comes after a run already stopped on one (a second SIGTERM
    50 ms after the first, arriving once the run's own handlers are gone) is
    ignored, so the process still exits with the run's code, never killed
    by the default action.
    """
    def handler(signum, frame):
        if _received:
            return
        raise SystemExit(128 + signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)


def hold_signals_if_stopped() -> None:
    """Block SIGINT/SIGTERM for the rest of a process whose run already stopped on one.

    Python resets its handlers while the interpreter shuts down; a second signal
    arriving then would kill the process by the default action (exit -15) instead
    of its documented code. Blocked, it stays pending and dies with the process.
    """
    if _received and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


class Interrupted(KeyboardInterrupt):
    """A second signal stopped the run at once, without a new checkpoint. ``signal``: its name."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal = signal_name


class StopFlag:
    """What the loop checks each step: ``name`` of the first signal (or "halt_at"), if any."""

    def __init__(self) -> None:
        self.name: Optional[str] = None
        self._writing = 0
        self._pending: Optional[str] = None

    def __bool__(self) -> bool:
        return self.name is not None

    def hit(self, name: str) -> None:
        _received.append(name)
        if self.name is None:
            self.name = name
        elif self._writing:
            self._pending = name
        else:
            raise Interrupted(name)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """A file write that a second signal must not cut in half."""
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1
        if not self._writing and self._pending:
            name, self._pending = self._pending, None
            raise Interrupted(name)


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Route SIGINT and SIGTERM to a StopFlag for the duration; the old handlers come back after."""
    flag = StopFlag()
    old = {}

    def handler(signum, frame):
        flag.hit(signal.Signals(signum).name)

    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            old[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread: no graceful stop there
            pass
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)
