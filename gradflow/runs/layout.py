"""A trainer run folder: its layout, the log's columns, and its log read back as rows.

The trainer writes the folder (``gradflow.runs.log``; the lock is in
``training/folder.py``) and :mod:`gradflow.runs.read` turns folders into tables; both
read the log through :func:`read_log` here. Neither torch nor pandas is imported,
so reading a run never imports the trainer.

Only rank 0 writes. Layout of ``runs/<name>/``:

- ``config.json``   the resolved TrainConfig, gradflow version and git commit, device, precision
- ``log.jsonl``, ``log.csv``  one row per log point (COLUMNS); test columns empty between evals
- ``checkpoint.pt`` the latest good checkpoint (see gradflow/runs/checkpoint.py)
- ``status.json``   "running", "ok", "fail" (test error above the paper's 20%), "diverged",
  "interrupted", "crashed" (the process died with an exception; ``error`` says which)
- ``probe.csv``     per-unit gradient-flow records with their iteration (--probe-every)
- ``paths.csv``     the exact split of dE/dx_l by path length at each probe (--probe-paths)
- ``.lock``         who trains here now (pid, host, start); flock'ed while a process trains

Guarantees: JSON files and the checkpoint are replaced atomically; a log row is
appended whole or not at all (a failed append is cut back); resume keeps exactly
the rows the checkpoint vouches for and replaces the logs atomically; one process
at a time trains in a folder.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from gradflow.errors import GradflowError

# Every file the trainer writes in a run folder, by role: the one list of them (starting over removes
# them all; the folder's lock is ``.lock``, interrupted atomic writes leave ``.<name>.*.tmp``).
FILES = {"config": "config.json", "log": "log.jsonl", "log_csv": "log.csv", "checkpoint": "checkpoint.pt",
         "status": "status.json", "probe": "probe.csv", "paths": "paths.csv"}

COLUMNS = ("iteration", "epoch", "lr", "train_loss", "train_error", "test_loss", "test_error",
           "images_per_s", "wall_time")
TIMING = ("images_per_s", "wall_time")  # the columns that differ between identical runs

__all__ = ["COLUMNS", "FILES", "TIMING", "read_log"]


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The log rows of a run folder, as dicts (empty if none yet).

    A half-written last line (a run killed mid-append) is skipped with a warning;
    a damaged line elsewhere is a GradflowError naming it.
    """
    path = Path(run_dir) / FILES["log"]
    if not path.exists():
        return []
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: skipped a half-written last line (the run is writing it, or was stopped "
                              "mid-write: --resume repairs that)", stacklevel=2)
                break
            raise GradflowError(f"{path} line {i + 1} is damaged: {line[:60]!r}") from None
    return rows
