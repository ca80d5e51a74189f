"""Reading trainer run folders into tidy tables, for figures and notebooks.

A run folder (``gradflow train``; layout in :mod:`gradflow.runs.layout`) holds
``config.json``, a log (``log.jsonl`` and/or ``log.csv``), ``status.json`` and,
with ``--probe-every``, ``probe.csv`` (the tracer's units table plus an
``iteration`` column). The readers are tolerant: either log format, older or
shorter column names (``train_err``, ``test_err``, ``images/s``), missing files.
Errors are fractions in [0, 1], as the trainer writes them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd

from gradflow.errors import GradflowError
from gradflow.runs.layout import read_log

# other spellings of the log's columns -> the trainer's names
ALIASES = {"train_err": "train_error", "test_err": "test_error", "images/s": "images_per_s",
           "img_per_s": "images_per_s", "iter": "iteration", "step": "iteration"}


@dataclass
class Run:
    """One run folder: its resolved config, log, probe records and status."""

    path: Path
    label: str
    config: dict = field(default_factory=dict)   # config.json as written (config, code, device, ...)
    log: pd.DataFrame = field(default_factory=pd.DataFrame)    # one row per log point, + ``run``
    probe: pd.DataFrame = field(default_factory=pd.DataFrame)  # the units table per probe, + ``run``
    status: dict = field(default_factory=dict)
    paths: pd.DataFrame = field(default_factory=pd.DataFrame)  # the path-length split per probe (paths.csv)

    @property
    def device(self) -> str:
        """The hardware the run used and its precision, as the trainer recorded them ('' if unknown)."""
        dev = str(self.config.get("device", ""))
        world = self.config.get("world_size")
        dev = f"{dev} x{world}" if dev and world and int(world) > 1 else dev
        precision = self.config.get("precision")   # recorded since the CPU default became hardware-dependent
        return f"{dev} ({precision})" if dev and precision else dev

    @property
    def train_config(self) -> dict:
        return self.config.get("config", self.config)


def read_log_table(run_dir: str | Path) -> pd.DataFrame:
    """The log of a run folder as a DataFrame sorted by iteration (JSONL preferred, CSV otherwise).

    The JSONL rows come from :func:`gradflow.runs.layout.read_log` (the trainer's reader too): a
    half-written last line of a run still writing, or stopped mid-write, is left out with a warning.
    """
    run_dir = Path(run_dir)
    jsonl, csv = run_dir / "log.jsonl", run_dir / "log.csv"
    if jsonl.exists() and jsonl.stat().st_size:
        log = pd.DataFrame(read_log(run_dir))
    elif csv.exists() and csv.stat().st_size:
        log = pd.read_csv(csv)
    else:
        return pd.DataFrame(columns=["iteration", "train_loss", "test_error"])
    log = log.rename(columns={k: v for k, v in ALIASES.items() if k in log and v not in log})
    for col in log.columns[log.dtypes == object]:
        try:
            log[col] = pd.to_numeric(log[col])
        except (ValueError, TypeError):
            pass
    return log.sort_values("iteration").reset_index(drop=True) if "iteration" in log else log


def read_probe(run_dir: str | Path) -> pd.DataFrame:
    """``probe.csv`` of a run folder (empty if the run had no ``--probe-every``)."""
    path = Path(run_dir) / "probe.csv"
    if not path.exists() or not path.stat().st_size:
        return pd.DataFrame()
    probe = pd.read_csv(path)
    if "is_top" in probe:
        probe["is_top"] = probe["is_top"].astype(str).str.lower().isin(("true", "1"))
    return probe


def read_paths(run_dir: str | Path) -> pd.DataFrame:
    """``paths.csv`` of a run folder: dE/dx_l by path length k at each probe (empty without
    ``--probe-paths``); columns as ``tr.paths`` plus ``iteration``."""
    path = Path(run_dir) / "paths.csv"
    if not path.exists() or not path.stat().st_size:
        return pd.DataFrame()
    return pd.read_csv(path)


def read_run(run_dir: str | Path, label: Optional[str] = None) -> Run:
    """Read one run folder into tables.

    Args:
        run_dir: a folder ``python -m gradflow train`` wrote.
        label: the run's name in tables and figures; defaults to the folder's name.
    Returns:
        A :class:`Run`: ``config``, ``log``, ``probe``, ``paths`` (tables) and ``status``.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise GradflowError(f"run folder {str(path)!r} does not exist: pass a folder that "
                            "gradflow train wrote (it holds config.json and log.jsonl)")
    if not any((path / f).exists() for f in ("config.json", "log.jsonl", "log.csv")):
        raise GradflowError(f"{str(path)!r} holds no config.json, log.jsonl or log.csv: "
                            "is it a gradflow train run folder?")

    def _json(name: str) -> dict:
        f = path / name
        if not (f.exists() and f.stat().st_size):
            return {}
        try:
            obj = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise GradflowError(f"{f} is damaged ({type(e).__name__}: {str(e)[:80]}): resume the run "
                                "(gradflow train --resume rewrites it from the checkpoint) or leave the "
                                "folder out") from None
        if not isinstance(obj, dict):
            raise GradflowError(f"{f} is not a JSON object: resume the run or leave the folder out")
        return obj

    label = label or path.name
    log, probe = read_log_table(path), read_probe(path)
    for table in (log, probe):
        table.insert(0, "run", label)
    return Run(path, label, _json("config.json"), log, probe, _json("status.json"), read_paths(path))


def read_runs(run_dirs: Iterable[str | Path]) -> list[Run]:
    """Read several run folders; labels are folder names, made unique where two collide."""
    runs, seen = [], {}
    for d in run_dirs:
        name = Path(d).name
        seen[name] = seen.get(name, 0) + 1
        runs.append(read_run(d, name if seen[name] == 1 else f"{name} ({seen[name]})"))
    return runs


def logs(runs: Iterable[Run]) -> pd.DataFrame:
    """All runs' logs in one long table with a ``run`` column."""
    tables = [r.log for r in runs if not r.log.empty]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["run"])
