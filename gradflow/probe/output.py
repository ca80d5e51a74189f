"""Writing a probe's files: units table (CSV), report (JSON), resolved config (JSON), figure (PNG).

Each file is written to a temporary file in the output folder and moved into
place with ``os.replace``, so a reader never sees half a file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gradflow.errors import GradflowError
from gradflow.utils.io import atomic_write, json_text

FILES = {"units": "units.csv", "summary": "summary.json", "config": "config.json", "figure": "figure.png"}


def prepare_out(out: str | Path) -> Path:
    """Create the output folder and check it can be written, before any work is done."""
    path = Path(out).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".probe-", dir=path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise GradflowError(f"cannot write the output folder {path} ({e.strerror or e}): "
                            "pass a writable --out") from None
    return path


def write_outputs(result, report: dict, out: Path) -> dict[str, str]:
    """Write the four files into ``out``; returns name -> path written."""
    paths = {k: out / v for k, v in FILES.items()}
    fig = result.figure()   # drawn first: a figure that cannot be drawn leaves no file half the set
    try:
        atomic_write(paths["units"], lambda f: result.units.to_csv(f, index=False))
        atomic_write(paths["config"], lambda f: f.write(_json(result.config)))
        atomic_write(paths["summary"], lambda f: f.write(_json(report)))
        atomic_write(paths["figure"], lambda f: fig.savefig(f, format="png", dpi=120))
    except OSError as e:
        raise GradflowError(f"cannot write into {out} ({e.strerror or e}): pass a writable --out") from None
    return {k: str(p) for k, p in paths.items()}


def _json(obj) -> bytes:
    return json_text(obj).encode()
