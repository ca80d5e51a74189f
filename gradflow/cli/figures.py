"""The command that regenerates ``figures/``: ``python -m gradflow figures`` (draws with :mod:`gradflow.plot`).

At initialisation, on any CPU in a few minutes: every Table 1 and Table 2
variant at its real depth, and ResNet-1001 original vs pre-activation, each
traced once at a fixed seed on one small batch of N(0, 1) images. With
``--runs DIR ...`` also the training curves and gradient-flow-over-training
figures of trainer run folders, labelled with the run folder and its hardware.
Every figure ``<name>.png`` gets a caption ``<name>.txt``: the command, the
configurations, seed, batch, torch version, code version and hardware.
"""
from __future__ import annotations

import argparse
import fnmatch
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd
import torch

from gradflow.utils.io import atomic_write_text
from gradflow.models.paper import paper_rows
from gradflow.utils.provenance import code_version, hardware

INPUT = ("the probe's synthetic batch: N(0, 1) images [batch, 3, 32, 32] and uniform labels, drawn from "
         "a generator seeded with the seed; model built at the same seed (He init), in train mode (BN batch "
         "statistics), mean cross-entropy, one forward and backward pass (gradflow.probe.trace_at_init; "
         "python -m gradflow.probe --model MODEL --seed SEED --batch-size BATCH traces the same network "
         "on the same batch)")


@dataclass(frozen=True)
class Config:
    """One network to trace: a registered model and its create_model options."""

    label: str
    model: str
    options: tuple = ()  # sorted (key, value) pairs, hashable

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options)
        return f"{self.label}: create_model({self.model!r}{', ' if opts else ''}{opts})"


@dataclass
class FigureSpec:
    """A figure: its file name, what it shows, the configurations it needs, and how to draw it."""

    name: str
    what: str
    configs: list[Config]
    draw: Callable[[dict], "object"]  # {label: (units, samples)} -> Figure
    batch: Optional[int] = None       # None: --batch


def _config(label: str, model: str, options: dict) -> Config:
    return Config(label, model, tuple(sorted(options.items())))


def table_configs(table: str, model: Optional[str] = None) -> list[Config]:
    """The CIFAR-10 rows of a paper table (:mod:`gradflow.models.paper`, the one source of the variants)."""
    return [_config(r.label, r.model, r.options)
            for r in paper_rows(table, model, dataset="cifar10", runnable=True)]


def figure_specs(deep_batch: int = 8) -> list[FigureSpec]:
    """Every at-initialisation figure, in the order they are made."""
    from gradflow import plot

    def units(traces, cfgs):
        return {c.label: traces[c][0] for c in cfgs}

    def samples(traces, cfgs):
        return {c.label: traces[c][1] for c in cfgs}

    t1 = table_configs("1")
    t2 = {m: table_configs("2", m) for m in ("resnet110", "resnet164")}
    t2_all = [Config(f"{m} {c.label}", c.model, c.options) for m, cs in t2.items() for c in cs]
    deep = [c for c in table_configs("3", "resnet1001")]
    specs = [
        FigureSpec("table1_gradient_depth", "Table 1 shortcut variants (ResNet-110, original units): "
                   "gradient norm per unit, total vs direct term vs eq. (8)", t1,
                   lambda tr: plot.gradient_depth(units(tr, t1), title="Table 1 shortcuts, ResNet-110 at "
                                                  "init: ||dE/dx_l||/||dE/dx_L||, total vs direct vs eq. (8)")),
        FigureSpec("table1_decay_rates", "Table 1: fitted decay rate of the total gradient and of the direct "
                   "term, as the change of ln(ratio) per unit toward the input (> 0: it grows toward the input). "
                   "Eq. (8)'s rate (log lambda) is drawn only where it covers the units; it covers none here: a "
                   "ReLU follows each addition in these original units (f is not the identity), and gates, "
                   "dropout and 1x1 convs have no closed-form lambda", t1,
                   lambda tr: plot.decay_rates(units(tr, t1), title="Table 1 shortcuts, ResNet-110 at "
                                               "init: decay rates across depth (95% CI)")),
        FigureSpec("table1_cosine", "Table 1: per-sample cosine between the direct and residual terms",
                   t1, lambda tr: plot.cosine_distribution(samples(tr, t1), title="Table 1 shortcuts, "
                                                           "ResNet-110 at init: cos(direct, residual) "
                                                           "per sample")),
    ]
    for m, cfgs in t2.items():
        specs += [
            FigureSpec(f"table2_{m}_gradient_depth", f"Table 2 activation placements ({m}): gradient "
                       "norm per unit, total vs direct term vs eq. (5)", cfgs,
                       lambda tr, m=m, cfgs=cfgs: plot.gradient_depth(
                           units(tr, cfgs), ncols=3, title=f"Table 2 units, {m} at init: "
                           "||dE/dx_l||/||dE/dx_L||, total vs direct vs eq. (5)")),
            FigureSpec(f"table2_{m}_activation_variance", f"Table 2 activation placements ({m}): "
                       "Var(x_l) per unit against linear growth", cfgs,
                       lambda tr, m=m, cfgs=cfgs: plot.activation_growth(
                           units(tr, cfgs), ncols=3, title=f"Table 2 units, {m} at init: Var(x_l) "
                           "vs linear growth")),
            FigureSpec(f"table2_{m}_cosine", f"Table 2 activation placements ({m}): per-sample cosine "
                       "between the direct and residual terms", cfgs,
                       lambda tr, m=m, cfgs=cfgs: plot.cosine_distribution(
                           samples(tr, cfgs), ncols=3, title=f"Table 2 units, {m} at init: "
                           "cos(direct, residual) per sample")),
        ]
    specs += [
        FigureSpec("table2_decay_rates", "Table 2: fitted decay rates, ResNet-110 and ResNet-164",
                   t2_all, lambda tr: plot.decay_rates(units(tr, t2_all), title="Table 2 units at init: "
                                                       "decay rates across depth (95% CI)")),
        FigureSpec("resnet1001_gradient_depth", "ResNet-1001, original vs full pre-activation units: "
                   "gradient norm per unit, total vs direct term vs eq. (5)", deep,
                   lambda tr: plot.gradient_depth(units(tr, deep), ncols=2, title="ResNet-1001 at init: "
                                                  "||dE/dx_l||/||dE/dx_L||, total vs direct vs eq. (5)"),
                   batch=deep_batch),
        FigureSpec("resnet1001_activation_variance", "ResNet-1001, original vs full pre-activation: "
                   "Var(x_l) per unit against linear growth", deep,
                   lambda tr: plot.activation_growth(units(tr, deep), ncols=2, title="ResNet-1001 at "
                                                     "init: Var(x_l) vs linear growth"), batch=deep_batch),
        FigureSpec("resnet1001_cosine", "ResNet-1001, original vs full pre-activation: per-sample cosine "
                   "between the direct and residual terms", deep,
                   lambda tr: plot.cosine_distribution(samples(tr, deep), ncols=2, title="ResNet-1001 at "
                                                       "init: cos(direct, residual) per sample"),
                   batch=deep_batch),
    ]
    return specs


def trace_at_init(config: Config, batch: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trace one forward/backward of a freshly initialised model: (units, samples).

    The probe's own step (:func:`gradflow.probe.trace_at_init`): the same
    network, batch and labels as ``python -m gradflow.probe`` at this seed and batch.
    """
    from gradflow.probe.step import trace_at_init as trace_once_at_init
    traced = trace_once_at_init(config.model, dict(config.options), seed=seed, batch_size=batch)
    return traced.units, traced.samples


def _caption(lines: list[str], common: list[str]) -> str:
    return "\n".join(lines + common) + "\n"


def _common(command: str) -> list[str]:
    code = code_version()
    return [f"command: {command}",
            f"gradflow: {code.get('gradflow', '?')}, git commit {code.get('git_commit', 'unknown')}"
            + (" with uncommitted changes" if code.get("git_dirty") else ""),
            f"torch: {torch.__version__}, python {platform.python_version()}",
            f"hardware: {hardware()}"]


def run_figures(specs: Sequence[FigureSpec], out: Path, formats: Sequence[str], batch: int, seed: int,
                command: str, log=print) -> list[Path]:
    """Trace what the specs need (each configuration once per batch size), draw, write files."""
    from gradflow.plot.style import save_figure
    out.mkdir(parents=True, exist_ok=True)
    traces: dict[tuple, tuple] = {}  # (model, options, batch) -> (units, samples): each traced once
    common = _common(command)
    written = []
    for spec in specs:
        b = spec.batch or batch
        t0 = time.perf_counter()
        for c in spec.configs:
            if (c.model, c.options, b) not in traces:
                traces[(c.model, c.options, b)] = trace_at_init(c, b, seed)
        fig = spec.draw({c: traces[(c.model, c.options, b)] for c in spec.configs})
        written += save_figure(fig, out, spec.name, formats)
        caption = [f"{spec.name}: {spec.what}.",
                   f"made at initialisation (no training), seed {seed}, batch {b}: {INPUT}.",
                   "configurations:"] + [f"  {c.describe()}" for c in spec.configs]
        atomic_write_text(out / f"{spec.name}.txt", _caption(caption, common))
        log(f"{spec.name}: {len(spec.configs)} configurations, {time.perf_counter() - t0:.1f}s")
    return written


def run_training_figures(run_dirs: Sequence[str], out: Path, formats: Sequence[str], command: str,
                         log=print) -> list[Path]:
    """Training curves of all runs, and gradient flow over training of each run with probe records."""
    from gradflow import plot
    from gradflow.plot.style import save_figure
    from gradflow.runs.read import logs, read_runs
    runs = read_runs(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    common = _common(command)

    def about(r) -> str:
        cfg = r.train_config
        opts = ", ".join(f"{k}={v!r}" for k, v in cfg.get("model_options", {}).items())
        return (f"  {r.label}: run folder {r.path}, hardware {r.device or 'not recorded'}, "
                f"model {cfg.get('model', '?')}({opts}), dataset {cfg.get('dataset', '?')}, "
                f"status {r.status.get('status', '?')}")

    written = []
    fig = plot.training_curves(logs(runs))
    written += save_figure(fig, out, "training_curves", formats)
    atomic_write_text(out / "training_curves.txt", _caption(
        ["training_curves: training loss (dashed, left axis) and test error (solid, right axis) against "
         "iterations, from real trainer runs (paper Fig. 1 / 6 style).", "runs:"]
        + [about(r) for r in runs], common))
    for r in runs:
        if r.probe.empty:
            continue
        name = f"{r.label}_gradient_flow".replace(" ", "_")
        fig = plot.gradient_flow_over_training(r.probe, title=f"Gradient flow over training: {r.label}")
        written += save_figure(fig, out, name, formats)
        atomic_write_text(out / f"{name}.txt", _caption(
            [f"{name}: log10 gradient ratio per unit over training (probe.csv, --probe-every) and the "
             "fitted decay rate per probed iteration.", "run:", about(r)], common))
    log(f"training figures from {len(runs)} run folder(s)")
    return written


ZOO_TABLE = ("predictions_zoo", "which predictions of docs/theory.md held on the zoo, per network "
             "(table: .csv per stage and seed, .md condensed)")


def run_zoo_table(out: Path, seeds: Sequence[int], command: str, log=print) -> list[Path]:
    """``predictions_zoo.csv`` (one row per network, seed, prediction, stage) and ``.md`` (the README's table)."""
    from gradflow.probe.zoo import held_table, to_markdown, zoo_predictions
    t0 = time.perf_counter()
    rows = zoo_predictions(seeds)
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / f"{ZOO_TABLE[0]}.csv", out / f"{ZOO_TABLE[0]}.md"
    atomic_write_text(csv, rows.to_csv(index=False))
    atomic_write_text(md, to_markdown(*held_table(rows), seeds, command) + "\n" + "\n".join(_common(command)) + "\n")
    log(f"{ZOO_TABLE[0]}: {rows['network'].nunique()} networks x {len(seeds)} seeds, "
        f"{time.perf_counter() - t0:.1f}s")
    return [csv, md]


def get_args_parser() -> argparse.ArgumentParser:
    from gradflow.cli.args import Parser
    p = Parser(prog="gradflow figures", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="figures", help="output folder (default figures/)")
    p.add_argument("--format", nargs="+", default=["png"], choices=["png", "pdf", "svg"],
                   help="file formats (default png)")
    p.add_argument("--batch", type=int, default=16, help="batch of the ResNet-110/164 traces")
    p.add_argument("--deep-batch", type=int, default=8, help="batch of the ResNet-1001 traces")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zoo-seeds", type=int, default=3, metavar="N",
                   help="seeds 0..N-1 of the predictions_zoo table (default 3)")
    p.add_argument("--only", nargs="+", metavar="PATTERN",
                   help="make only the figures whose name matches (shell patterns, e.g. 'table1_*')")
    p.add_argument("--runs", nargs="+", metavar="RUN_DIR", default=[],
                   help="trainer run folders: also draw their training curves and gradient flow")
    p.add_argument("--no-init", action="store_true", help="skip the at-initialisation figures")
    p.add_argument("--list", action="store_true", help="list the figure names and exit")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    import matplotlib
    matplotlib.use("Agg")
    argv = list(sys.argv[1:] if argv is None else argv)
    from gradflow.cli.args import check_flags
    from gradflow.errors import GradflowError
    args = get_args_parser().parse_args(argv)
    try:
        check_flags(args)
        if args.zoo_seeds < 1:
            raise GradflowError(f"--zoo-seeds {args.zoo_seeds}: needs at least 1 seed")
        specs = figure_specs(args.deep_batch)
        zoo = True
        if args.only:
            names = [s.name for s in specs] + [ZOO_TABLE[0]]
            unmatched = [pat for pat in args.only if not any(fnmatch.fnmatch(n, pat) for n in names)]
            if unmatched:
                raise GradflowError(f"--only {' '.join(unmatched)} matches no figure: see --list for the names")
            specs = [s for s in specs if any(fnmatch.fnmatch(s.name, pat) for pat in args.only)]
            zoo = any(fnmatch.fnmatch(ZOO_TABLE[0], pat) for pat in args.only)
    except GradflowError as e:
        print(f"gradflow figures: error: {e}", file=sys.stderr)
        return 2
    if args.list:
        for s in specs:
            print(f"{s.name:36s} {s.what}")
        if zoo:
            print(f"{ZOO_TABLE[0]:36s} {ZOO_TABLE[1]}")
        return 0
    command = shlex.join(["python", "-m", "gradflow", "figures", *argv])
    out = Path(args.out)
    t0 = time.perf_counter()
    if not args.no_init:
        run_figures(specs, out, args.format, args.batch, args.seed, command)
        if zoo:
            run_zoo_table(out, range(args.zoo_seeds), command)
    if args.runs:
        from gradflow.errors import GradflowError
        try:
            run_training_figures(args.runs, out, args.format, command)
        except GradflowError as e:
            print(f"gradflow figures: error: {e}", file=sys.stderr)
            return 2
    print(f"gradflow figures: wrote {out}/ in {time.perf_counter() - t0:.0f}s")
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    sys.exit(main(argv))


if __name__ == "__main__":
    cli()
