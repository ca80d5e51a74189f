"""The variants to predict and their training outcomes: the paper's errors, and the runs of
``python -m gradflow experiment`` at a scale (the laptop sweeps).

A variant is one network (a registered model and its unit options); the rows of Tables 1 and 2
that build the same network (Table 1's original unit and Table 2's ResNet-110 original) are one
variant, named after its first row, with the runs of both rows pooled.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from gradflow.experiments.divergence import divergence
from gradflow.experiments.ordering import paper_rank

SEED = re.compile(r"-seed(\d+)$")


@dataclass
class Variant:
    """One network of the paper's tables: the rows that build it and the paper's error."""

    name: str
    model: str
    options: dict
    paper_error: str
    rows: list = field(default_factory=list)   # full row names (table1-original, table2-resnet110-original)
    experiments: list = field(default_factory=list)

    @property
    def paper(self) -> Optional[float]:
        """The paper's error as a number (inf: "fail"; None: not reported)."""
        return paper_rank(self.paper_error)


def variants(experiments: list[str]) -> list[Variant]:
    """The variants of ``experiments`` (``table1``, ``table2``) in the paper's order, duplicates merged."""
    from gradflow.experiments.planning import experiment_rows
    from gradflow.models.registry import model_options
    out: dict[tuple, Variant] = {}
    for exp in experiments:
        for row in experiment_rows(exp):
            if row.missing:
                continue
            full = dict(model_options(row.model), **row.options)    # defaults spelled out or not: one network
            key = (row.model, tuple(sorted((k, repr(v)) for k, v in full.items())))
            if key not in out:
                out[key] = Variant(row.short, row.model, dict(row.options), row.paper_error)
            out[key].rows.append(row.name)
            out[key].experiments.append(exp)
    return list(out.values())


def _classes(config: dict) -> int:
    ds = (config.get("config") or config).get("dataset", "cifar10")
    return 100 if ds == "cifar100" else 10


def laptop_runs(vs: list[Variant], runs_dir: Path, scale: str = "laptop") -> pd.DataFrame:
    """Every finished run of the variants under ``runs_dir/<experiment>-<scale>/runs/``.

    Returns one line per run: ``variant``, ``row``, ``seed``, ``folder``, ``error`` (% test error;
    a run that diverged counts at chance, the error of a network whose outputs are NaN or constant),
    ``logged_error`` (its last logged one, if any), ``diverged`` (bool), ``note`` and ``repeat``: True
    for a run whose variant already has a run of its seed from another row (Table 1's identity row and
    Table 2's ResNet-110 original build one network): the same network and seed is not a new training
    seed, so ``laptop_outcome`` counts it once.
    """
    from gradflow.experiments.results import final_error
    from gradflow.experiments.runner import run_state
    from gradflow.runs.read import read_run
    lines = []
    for v in vs:
        for row, exp in zip(v.rows, v.experiments):
            base = Path(runs_dir) / f"{exp}-{scale}" / "runs"
            for folder in sorted(base.glob(f"{row}-seed*")) if base.is_dir() else []:
                m = SEED.search(folder.name)
                if not m or not folder.is_dir() or run_state(folder) != "finished":
                    continue
                run = read_run(folder)
                classes = _classes(run.config)
                chance = 100.0 * (1 - 1 / classes)
                div = divergence(run.log, classes, run.status)
                err = final_error(run)
                logged = None if err is None or not math.isfinite(err) else 100.0 * err
                error = chance if div.diverged or logged is None else logged
                lines.append(dict(variant=v.name, row=row, seed=int(m.group(1)), folder=str(folder), error=error,
                                  logged_error=logged, diverged=div.diverged, chance=chance,
                                  note=div.text))
    df = pd.DataFrame(lines, columns=["variant", "row", "seed", "folder", "error", "logged_error", "diverged",
                                      "chance", "note"])
    df["repeat"] = df.duplicated(["variant", "seed"]).astype(bool)
    return df


def paper_outcome(vs: list[Variant]) -> dict:
    """{variant: [the paper's error]} ("fail" as inf); variants without a paper error left out."""
    return {v.name: [v.paper] for v in vs if v.paper is not None}


def laptop_outcome(runs: pd.DataFrame) -> dict:
    """{variant: [error % per training seed]}: one run per seed, a repeat of a seed left out."""
    runs = runs[~runs["repeat"]] if "repeat" in runs else runs
    return {v: g["error"].tolist() for v, g in runs.groupby("variant", sort=False)}
