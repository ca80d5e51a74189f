"""Writing files so that nothing is lost: a reader sees the old file or the new one.

Files gradflow writes whole (checkpoints, config/status/summary JSON, the probe's
and the figures' outputs, a run's logs when resume cuts them back) go through
:func:`atomic_write`: a temporary file ``.<name>.<random>.tmp`` in the same
folder, then ``os.replace``. The file gets the permissions any newly created
file gets (``0o666`` less the user's umask), not ``mkstemp``'s 0600, so run
folders can be shared as the user's other files are.

Files that grow row by row are appended in place instead, not replaced: a run's
``log.jsonl``, ``log.csv``, ``probe.csv`` and ``paths.csv`` (each row appended
whole or the file cut back to its old size, ``training/runlog.py``; resume keeps
only the rows the checkpoint vouches for) and the tracer's CSV/JSONL sinks (one
write per step; a process killed during it can leave a partial last line).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def umask() -> int:
    """The process's umask (read from /proc where it can be, so nothing is changed, else set back)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], fsync: bool = False) -> Path:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, then move it into place.

    Args:
        path: the file to (re)place.
        write: called once with the open temporary file.
        fsync: also force the bytes to disk before the move (checkpoints, logs).

    Returns:
        ``path``. On any error (a full disk included) the temporary file is removed
        and the old ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())  # mkstemp makes 0600; the umask decides, as for open()
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of ``text`` encoded as UTF-8."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def json_safe(obj):
    """A JSON-safe copy: numpy scalars to Python, NaN and infinities to None (JSON has no NaN), tuples to lists.

    The one cleaner for every JSON file gradflow writes; anything else becomes its ``str``.
    """
    import math
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:   # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def json_text(obj) -> str:
    """``obj`` as indented, strict JSON (through :func:`json_safe`), with a final newline."""
    import json
    return json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n"
