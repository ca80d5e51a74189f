"""Errors gradflow raises on bad input. Each names the bad value and the fix."""
from __future__ import annotations

import difflib
from typing import Iterable


class GradflowError(ValueError):
    """Bad input to gradflow: the message names the value and how to fix it."""


class UnknownNameError(GradflowError, KeyError):
    """A name (model, preset, option) that does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def unknown(kind: str, name: str, known: Iterable[str]) -> UnknownNameError:
    """Build an UnknownNameError listing close matches and everything that exists."""
    known = sorted(known)
    close = difflib.get_close_matches(str(name), known, n=5, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    listing = ", ".join(known) if len(known) <= 40 else ", ".join(known[:40]) + ", ..."
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Known {kind}s: {listing}")


def first_line(e: BaseException) -> str:
    """An exception's message, first line only (library errors can run to pages)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
