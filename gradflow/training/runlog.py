"""The run folder: resolved config, the JSONL/CSV log, the status, the probe table.

Only rank 0 writes. Layout of ``runs/<name>/``:

- ``config.json``   the resolved TrainConfig, gradflow version and git commit
- ``log.jsonl``, ``log.csv``  one row per log point (COLUMNS); test columns empty between evals
- ``checkpoint.pt`` the latest good checkpoint (see checkpoint.py)
- ``status.json``   "running", "ok", "fail" (test error above the paper's 20%), "diverged", "interrupted"
- ``probe.csv``     per-unit gradient-flow records with their iteration (--probe-every)
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from ..errors import GradflowError
from ..io import atomic_write_text

COLUMNS = ("iteration", "epoch", "lr", "train_loss", "train_error", "test_loss", "test_error",
           "images_per_s", "wall_time")
TIMING = ("images_per_s", "wall_time")  # the columns that differ between identical runs


def default_name(model: str, dataset: str, preset: Optional[str]) -> str:
    return f"{preset or model}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_run_dir(out_dir: str, name: str, exist_ok: bool = False) -> Path:
    """Create ``out_dir/name``; an unwritable or taken folder is a GradflowError naming the fix."""
    path = Path(out_dir) / name
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except FileExistsError:
        raise GradflowError(f"run folder {path} already exists: pass --resume {path} to continue it, "
                            "or another --run-name") from None
    except OSError as e:
        raise GradflowError(f"cannot write the run folder {path} ({e.strerror}): "
                            "pass a writable --out-dir") from None
    return path


def code_version() -> dict[str, str]:
    from .. import __version__
    info = {"gradflow": __version__}
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            info["git_commit"] = out.stdout.strip()
            # uncommitted changes to tracked files: the commit alone does not name the code
            dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], cwd=here.parent,
                                   capture_output=True, timeout=5)
            info["git_dirty"] = dirty.returncode == 1
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class RunLog:
    """Appends log rows to log.jsonl and log.csv in ``run_dir``."""

    def __init__(self, run_dir: Path):
        self.jsonl, self.csv = run_dir / "log.jsonl", run_dir / "log.csv"

    def append(self, row: dict[str, Any]) -> None:
        row = {k: _clean(row.get(k)) for k in COLUMNS}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        new = not self.csv.exists()
        with open(self.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerow({k: "" if v is None else v for k, v in row.items()})

    def truncate(self, last_iteration: int) -> None:
        """Keep only rows up to ``last_iteration`` (rows written after the checkpoint we resume from)."""
        rows = read_log(self.jsonl.parent)
        keep = [r for r in rows if r["iteration"] <= last_iteration]
        for p in (self.jsonl, self.csv):
            if p.exists():
                p.unlink()
        for r in keep:
            self.append(r)


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The log rows of a run folder, as dicts (empty if none yet)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_probe(run_dir: Path, table, iteration: int) -> None:
    """Append a tracer's per-unit table (a pandas DataFrame) to probe.csv with an ``iteration`` column."""
    table = table.copy()
    table.insert(0, "iteration", iteration)
    path = run_dir / "probe.csv"
    table.to_csv(path, mode="a", header=not path.exists(), index=False)
