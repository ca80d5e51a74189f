"""SIGINT/SIGTERM during training: the first one stops the run at the next step with a checkpoint.

A second signal stops at once (``Interrupted``), except while a file is being
written: then it waits until the write is done, so a double Ctrl-C or two
SIGTERMs in a row never leave half a checkpoint or half a log line.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator, Optional


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
