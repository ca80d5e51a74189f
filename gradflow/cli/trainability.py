"""Predict trainability from one traced step at init, then check it against training outcomes.

    python -m gradflow trainability table1 table2 --runs runs/experiments     # laptop runs + paper
    python -m gradflow trainability table2 --seeds 5 --width 1                # the paper's errors only
    python -m gradflow trainability table1 table2 --predictors OUT/trainability_predictors.csv --runs DIR

Each variant of the tables is built at init seeds 0..N-1 and traced on a few batches
(gradflow.trainability.predictors); each predictor is then rank-correlated with the paper's test
errors and, with --runs, the median test error of the experiment's runs (``python -m gradflow
experiment TABLE --scale SCALE --out DIR``). Writes to --out: trainability_predictors.csv,
trainability_check.csv and .md, trainability.png and its .txt caption. Bad input: exit 2.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from gradflow.errors import GradflowError

PROG = "gradflow trainability"
TABLES = ("table1", "table2")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def get_args_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiments", nargs="+", metavar="TABLE", help="table1 and/or table2")
    p.add_argument("--runs", help="the experiment runner's --out folder (holds TABLE-SCALE/runs/); "
                   "without it only the paper's errors are predicted")
    p.add_argument("--scale", default="laptop", help="the runs' scale name (default laptop)")
    p.add_argument("--seeds", type=int, default=3, help="init seeds per variant (default 3)")
    p.add_argument("--width", type=float, default=0.5, help="channel multiplier of the traced nets "
                   "(default 0.5, the laptop runs'; 1: the paper's)")
    p.add_argument("--batch-size", type=int, default=8, help="inputs per batch, each traced beside its "
                   "moved copy (default 8: 16 per step)")
    p.add_argument("--batches", type=int, default=2, help="traced steps per seed (default 2)")
    p.add_argument("--data", help="CIFAR folder: trace real test images (default N(0,1) images)")
    p.add_argument("--device", default="cpu", help="where the traced steps run (default cpu; cuda for a GPU)")
    p.add_argument("--predictors", help="read the predictors from this CSV (a previous run's "
                   "trainability_predictors.csv) instead of measuring them")
    p.add_argument("--replicates", type=int, default=2000, help="bootstrap replicates (default 2000)")
    p.add_argument("--out", default="figures", help="where the outputs go (default figures)")
    p.add_argument("--format", nargs="+", default=["png"], choices=["png", "pdf", "svg"])
    return p


def _check_args(args) -> None:
    bad = [e for e in args.experiments if e not in TABLES]
    if bad:
        raise GradflowError(f"{', '.join(map(repr, bad))}: trainability takes {' and/or '.join(TABLES)}")
    for name, v, lo in (("--seeds", args.seeds, 1), ("--batch-size", args.batch_size, 2),
                        ("--batches", args.batches, 1), ("--replicates", args.replicates, 0)):
        if v < lo:
            raise GradflowError(f"{name} {v} must be >= {lo}")
    if not args.width > 0:
        raise GradflowError(f"--width {args.width} must be positive (0.5: the laptop nets)")
    if args.runs and not Path(args.runs).is_dir():
        raise GradflowError(f"--runs {args.runs!r} is not a folder: pass the experiment runner's --out")
    import torch
    try:
        torch.device(args.device)
    except RuntimeError:
        raise GradflowError(f"--device {args.device!r} is not a torch device: cpu, cuda or cuda:1") from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise GradflowError(f"--device {args.device}: no CUDA device is visible here; use --device cpu")
    if args.predictors and not Path(args.predictors).is_file():
        raise GradflowError(f"--predictors {args.predictors!r} does not exist: pass a trainability_predictors.csv")


def run(args, command: str) -> list[Path]:
    """Measure (or read) the predictors, check them, write the tables, figure and caption."""
    import matplotlib
    matplotlib.use("Agg")
    import pandas as pd
    from gradflow.cli.figures import _common
    from gradflow.plot.style import save_figure
    from gradflow.trainability import (laptop_outcome, laptop_runs, measure_variants, paper_outcome,
                                       rank_check, variants)
    from gradflow.trainability import report
    from gradflow.utils.io import atomic_write_text
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vs = variants(list(dict.fromkeys(args.experiments)))
    if args.predictors:
        preds = pd.read_csv(args.predictors)
        unknown = sorted(set(preds["variant"]) - {v.name for v in vs})
        preds = preds[preds["variant"].isin([v.name for v in vs])]
        widths = ", ".join(f"x{w:g}" for w in sorted(set(preds["width"]))) if "width" in preds else "?"
        steps = (f", {int(preds['batches'].iloc[0])} step(s) of {int(preds['batch_size'].iloc[0])} inputs + their "
                 f"moved copies, {preds['inputs'].iloc[0]}" if {"batches", "batch_size", "inputs"} <= set(preds)
                 else ", steps and inputs not recorded in the file")
        how = (f"predictors read from {args.predictors}: at least {preds.groupby('variant')['seed'].nunique().min()} "
               f"init seed(s) per variant, width {widths}{steps}"
               + (f" (not in these tables, left out: {', '.join(unknown)})" if unknown else ""))
    else:
        import torch
        preds = measure_variants(vs, args.seeds, args.width, args.batch_size, args.batches, args.data,
                                 device=torch.device(args.device), log=lambda m: print(f"{PROG}: {m}", flush=True))
        how = (f"predictors measured now: {args.seeds} init seed(s), {args.batches} step(s) of {args.batch_size} "
               f"inputs + their moved copies, width x{args.width:g}, "
               + (f"CIFAR test images from {args.data}" if args.data else "N(0,1) images")
               + f", on {args.device}, {preds['seconds'].sum():.0f} s in all")
        atomic_write_text(out / "trainability_predictors.csv", preds.to_csv(index=False))
    outcomes, runs = {}, None
    if args.runs:
        runs = laptop_runs(vs, Path(args.runs), args.scale)
        if len(runs):
            outcomes[args.scale] = laptop_outcome(runs)
        else:
            print(f"{PROG}: no finished run under {args.runs}/<table>-{args.scale}/runs: only the paper's "
                  "errors are predicted", file=sys.stderr)
    outcomes["paper"] = paper_outcome(vs)
    tables, notes = [], []
    for name, values in outcomes.items():
        t, n = rank_check(preds, values, name, args.replicates)
        tables.append(t)
        notes += n
    table = pd.concat(tables, ignore_index=True)
    about = [f"variants: {len(vs)} networks of {', '.join(args.experiments)} (rows building the same network "
             "merged)", how,
             "outcomes: " + "; ".join(f"{k}: {len(v)} variant(s)" for k, v in outcomes.items())
             + " (paper: He et al. 2016 Tables 1-2 at full scale, 'fail' (>20%) tied at the worst rank; "
             f"{args.scale}: the median final test error over the finished runs, a diverged run at chance)",
             "each predictor's direction is fixed before the outcomes are read (gradflow/trainability/"
             "predictors.py); rho > 0: it ranks the variants as it claims",
             f"intervals: 95% bootstrap over variants, init seeds and training seeds ({args.replicates} "
             "replicates); p_permutation: one-sided, outcomes permuted across variants"]
    found = report.lines(table, notes, runs)
    common = _common(command)
    written = []
    atomic_write_text(out / "trainability_check.csv", table.to_csv(index=False))
    summary = report.summary(preds, outcomes)
    atomic_write_text(out / "trainability_check.md",
                      report.markdown("Trainability from one traced step at init", about + found + common,
                                      table, summary))
    written += [out / "trainability_check.csv", out / "trainability_check.md"]
    fig = report.figure(preds, outcomes, table, runs, title="Predicted rank (one traced step at init) "
                        "against final test error; bars: range over seeds")
    written += save_figure(fig, out, "trainability", args.format)
    atomic_write_text(out / "trainability.txt", "\n".join(
        ["trainability: one panel per (outcome, predictor); x: the variant's predicted rank from its median "
         "score over init seeds (bars: its rank at each seed alone), y: its test error (laptop: median, "
         "bars: min-max over training seeds, red crosses: diverged runs at chance; paper: red triangles at "
         f"{report.FAIL_Y:.0f}% are its 'fail'). Titles: Spearman's rho [95% bootstrap interval]; FAILS: "
         "the interval does not lie above 0."] + about + found + common) + "\n")
    for line in found:
        print(f"{PROG}: {line}")
    print(f"{PROG}: results in {out / 'trainability_check.md'}")
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(argv)
    command = " ".join(shlex.quote(c) for c in ["python", "-m", "gradflow", "trainability", *argv])
    try:
        _check_args(args)
        run(args, command)
    except GradflowError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    sys.exit(main(argv))


if __name__ == "__main__":
    cli()
