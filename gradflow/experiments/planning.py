"""What an experiment trains: its rows (the paper's table rows), the scale, and one command per run.

An experiment is a list of rows (a Table 1/2/3 preset, or a depth-sweep row), each
trained with N seeds. A scale says how big: ``paper`` is the presets' recipe as
it stands (64k iterations, the paper's widths); ``laptop`` multiplies every
channel count by ``width`` and shrinks the iteration schedule by one factor, so
warm-up, lr drops and stop keep the paper's proportions (the same recipe shape).
"""
from __future__ import annotations

import fnmatch
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gradflow.errors import GradflowError, unknown
from gradflow.training.presets import RECIPES, Preset, presets

EXPERIMENTS = {
    "table1": "Table 1: shortcut variants of ResNet-110 (original units)",
    "table2": "Table 2: the five activation placements, ResNet-110 and ResNet-164",
    "table3": "Table 3: original vs pre-activation units, CIFAR-10 and CIFAR-100",
    "fig1": "Fig. 1: ResNet-1001 original vs pre-activation units on CIFAR-10",
    "depth": "Depth: the full pre-activation unit at 20 to 1001 layers on CIFAR-10",
}
PAPER_STOP = RECIPES["paper"]["stop"]   # 64,000 iterations


@dataclass(frozen=True)
class Scale:
    """How big the runs are: a channel multiplier and the run length in iterations."""

    name: str
    width: float = 1.0
    stop: int = PAPER_STOP            # iterations; milestones and warm-up scale with stop / 64k
    probe_every: int = 0              # iterations between gradient-flow probes (0: never)
    batch_size: int = 128             # the paper's batch; another one is a change of recipe, said so
    warmup: str = "constant"          # "linear" at laptop scale: a ramp, not the paper's held 0.01 (warmup_iters)

    def fields(self) -> dict[str, Any]:
        """TrainConfig fields this scale sets on top of the paper recipe ({} at the paper's scale)."""
        if self.stop == PAPER_STOP:
            out: dict[str, Any] = {}
        else:
            f = self.stop / PAPER_STOP
            r = RECIPES["paper"]
            out = dict(stop=self.stop, milestones=tuple(max(1, round(m * f)) for m in r["milestones"]),
                       warmup_iters=self.warmup_iters(), warmup_shape=self.warmup,
                       eval_every=max(1, self.stop // 10), log_every=max(1, self.stop // 32),
                       checkpoint_every=max(1, self.stop // 8))
        if self.probe_every:
            out["probe_every"] = self.probe_every
        if self.batch_size != RECIPES["paper"]["batch_size"]:
            out["batch_size"] = self.batch_size
        return out

    def warmup_iters(self) -> int:
        """Warm-up length: the paper's 400 of 64k iterations; 1/8 of a shorter run, 1/4 for a ramp.

        The paper warms up "until the training error is below 80% (about 400 iterations)": a number
        of steps the network needs, not a fraction of the run. Scaled by 64k/stop alone it would be a
        single step at laptop scale, after which the 1x1-conv shortcut row diverged. Held at 0.01 for
        1/8 of the run (50 of 400 iterations), then stepped to 0.1, ResNet-110 at width 0.5 spiked
        (loss 2.3 -> 3.2) and never left chance, in 3 of 3 tries (bf16 and float32, and with 100
        iterations held); a linear ramp from 0.01 to 0.1 over 1/4 of the run (100 of 400) trains
        on through the full rate. So the laptop scale ramps (``warmup="linear"``), and says so.
        """
        paper = RECIPES["paper"]["warmup_iters"]
        if self.stop >= PAPER_STOP:
            return paper
        share = 4 if self.warmup == "linear" else 8
        return min(paper, max(round(paper * self.stop / PAPER_STOP), self.stop // share, 1))

    def describe(self) -> str:
        what = "the paper's widths" if self.width == 1 else f"width x{self.width:g}"
        batch = "" if self.batch_size == 128 else " (not the paper's 128)"
        shape = ("the paper's recipe shape" if self.warmup == "constant" or self.stop >= PAPER_STOP else
                 f"the paper's recipe shape but for the warm-up: lr ramped linearly from 0.01 to 0.1 over "
                 f"{self.warmup_iters()} iterations, where the paper holds 0.01")
        return f"{self.name} scale ({what}, {self.stop:,} iterations at batch {self.batch_size}{batch}, {shape})"


def make_scale(name: str, width: Optional[float] = None, stop: Optional[int] = None,
               probe_every: Optional[int] = None, batch_size: Optional[int] = None) -> Scale:
    """The named scale (``paper`` or ``laptop``) with any explicit override."""
    base = {"paper": Scale("paper", 1.0, PAPER_STOP), "laptop": Scale("laptop", 0.5, 400, warmup="linear")}
    if name not in base:
        raise unknown("scale", name, base)
    s = base[name]
    width = s.width if width is None else width
    stop = s.stop if stop is None else stop
    # default probes: 16 over a run (every 4,000 iterations at the paper's 64k); 4 on a laptop
    probe = (stop // (16 if name == "paper" else 4)) if probe_every is None else probe_every
    if not width > 0:
        raise GradflowError(f"--width {width!r} must be positive (0.25: a quarter of the paper's channels)")
    if stop < 4:
        raise GradflowError(f"--stop {stop!r} is too short for the recipe's warm-up and two lr drops: use >= 4")
    batch = 128 if batch_size is None else batch_size
    if batch < 1:
        raise GradflowError(f"--batch-size {batch!r} must be a positive integer (the paper's is 128)")
    if probe < 0:
        raise GradflowError(f"--probe-every {probe!r} must be >= 0 (0: no gradient-flow probes)")
    return Scale(name, float(width), int(stop), int(probe), int(batch), s.warmup)


@dataclass(frozen=True)
class Row:
    """One row of an experiment: a preset (or a model and its options) and the paper's error."""

    name: str
    model: str
    options: dict = field(default_factory=dict)
    dataset: str = "cifar10"
    paper_error: str = ""
    preset: Optional[str] = None      # train with --preset (its recipe) rather than --model
    missing: Optional[str] = None     # why the zoo cannot build this row, if it cannot
    group: str = ""                   # panel of the training-curve figure

    @property
    def short(self) -> str:
        """The row's label in figures: the name without its table prefix."""
        return self.name.split("-", 1)[1] if self.name.startswith(("table", "fig1-", "depth-")) else self.name


def _from_preset(p: Preset, group: str = "") -> Row:
    return Row(p.name, p.model, dict(p.options), p.dataset, p.paper_error, p.name, p.missing, group)


def experiment_rows(name: str) -> list[Row]:
    """Every row of experiment ``name`` in the paper's order (rows the zoo cannot build included)."""
    if name not in EXPERIMENTS:
        raise unknown("experiment", name, EXPERIMENTS)
    table = presets().values()
    if name == "table1":
        return [_from_preset(p) for p in table if p.table == "1"]
    if name == "table2":
        return [_from_preset(p, p.model) for p in table if p.table == "2"]
    if name == "table3":
        return [_from_preset(p, f"{p.dataset} {p.model}" + ("-1layer" if "1layer" in p.name else ""))
                for p in table if p.table == "3"]
    if name == "fig1":
        return [_from_preset(p, "resnet1001") for p in table
                if p.table == "3" and p.dataset == "cifar10" and p.model == "resnet1001"]
    errors = {110: "6.37", 164: "5.46", 1001: "4.92"}   # Table 3, full pre-activation, CIFAR-10
    return [Row(f"depth-resnet{d}", f"resnet{d}", dict(unit="full_preact"), "cifar10", errors.get(d, ""))
            for d in (20, 56, 110, 164, 1001)]


def select_rows(rows: list[Row], patterns: Optional[list[str]]) -> list[Row]:
    """The rows whose full or short name matches one of ``patterns`` (shell-style); all if none."""
    if not patterns:
        return rows
    out = [r for r in rows if any(fnmatch.fnmatch(r.name, p) or fnmatch.fnmatch(r.short, p) for p in patterns)]
    if not out:
        raise GradflowError(f"--rows {','.join(patterns)} matches no row; the rows are: "
                            + ", ".join(r.short for r in rows))
    return out


@dataclass(frozen=True)
class RunSpec:
    """One training run of an experiment: a row at one seed, with its run folder."""

    row: Row
    seed: int
    folder: Path

    @property
    def key(self) -> str:
        return self.folder.name


def plan(rows: list[Row], seeds: int, exp_dir: Path) -> list[RunSpec]:
    """One RunSpec per (row, seed), rows in order, seeds 0..seeds-1 (rows the zoo lacks left out)."""
    return [RunSpec(r, s, exp_dir / "runs" / f"{r.name}-seed{s}") for r in rows if not r.missing
            for s in range(seeds)]


def train_args(spec: RunSpec, scale: Scale, data: str, verify: bool, device: Optional[str]) -> list[str]:
    """``gradflow train`` arguments of a fresh run of ``spec`` at ``scale``."""
    row = spec.row
    args = ["--preset", row.preset] if row.preset else ["--model", row.model, "--dataset", row.dataset]
    options = dict(row.options) if not row.preset else {}
    if scale.width != 1:
        options["width"] = scale.width
    for k, v in options.items():
        args += ["--model-opt", f"{k}={v!r}"]
    for k, v in scale.fields().items():
        flag = "--" + k.replace("_", "-")
        args += [flag, ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
    args += ["--seed", str(spec.seed), "--data", data, "--out-dir", str(spec.folder.parent),
             "--run-name", spec.folder.name, "--no-progress"]
    if not verify:
        args.append("--no-verify")
    if device:
        args += ["--device", device]
    return args


def resume_args(spec: RunSpec, data: str, verify: bool, device: Optional[str]) -> list[str]:
    """``gradflow train`` arguments that continue ``spec`` from its checkpoint."""
    args = ["--resume", str(spec.folder), "--data", data, "--no-progress"]
    if not verify:
        args.append("--no-verify")
    if device:
        args += ["--device", device]
    return args


def train_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "gradflow", "train", *args]
