"""Writing files so that nothing is lost: a reader sees the old file or the new one.

Every file gradflow writes (checkpoints, logs' JSON, probe outputs, figures)
goes through :func:`atomic_write`: a temporary file in the same folder, then
``os.replace``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], fsync: bool = False) -> Path:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, then move it into place.

    ``fsync=True`` also forces the bytes to disk before the move (checkpoints).
    On any error the temporary file is removed and the old ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
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
    return atomic_write(path, lambda f: f.write(text.encode()))
