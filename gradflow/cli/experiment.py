"""The paper's experiments from one command: every row x N seeds, then a results table and figures.

    python -m gradflow experiment table2 --scale laptop --data DIR      # run, skip done, resume, report
    python -m gradflow experiment table1 --data DIR --seeds 3 --gpus 0,1,2,3
    python -m gradflow experiment table3 --data DIR --print-commands     # one line per run (Slurm array)
    python -m gradflow experiment table3 --data DIR --collect            # table and figures afterwards

Experiments: table1, table2, table3, fig1 (ResNet-1001 original vs pre-activation), depth
(full pre-activation at 20 to 1001 layers). Bad input prints one line and exits with 2; a
sweep with runs that did not finish exits with 1; an interrupted sweep with 130.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from gradflow.errors import GradflowError

PROG = "gradflow experiment"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the whole usage)
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def get_args_parser() -> argparse.ArgumentParser:
    from gradflow.experiments import EXPERIMENTS
    p = _Parser(prog=PROG, description=__doc__.split("\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="\n".join(f"  {k:7s} {v}" for k, v in EXPERIMENTS.items()))
    p.add_argument("experiment", choices=list(EXPERIMENTS), metavar="EXPERIMENT",
                   help="one of: " + ", ".join(EXPERIMENTS))
    p.add_argument("--data", help="folder holding the CIFAR data (as for gradflow train)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the md5 check")
    p.add_argument("--scale", default="paper", help="'paper' (default: 64k iterations, the paper's "
                   "widths) or 'laptop' (width x0.5, 400 iterations, the same recipe shape, warm-up >= 1/8 of the run)")
    p.add_argument("--width", type=float, help="channel multiplier (overrides the scale's)")
    p.add_argument("--stop", type=int, help="iterations per run (overrides the scale's; the lr "
                   "schedule keeps the paper's proportions)")
    p.add_argument("--probe-every", type=int, help="iterations between gradient-flow probes "
                   "(default: 16 probes a run at paper scale, 4 at laptop; 0: none)")
    p.add_argument("--batch-size", type=int, help="batch (default the paper's 128; another is a "
                   "change of recipe, said in every output)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per row: 0..N-1 (default 1)")
    p.add_argument("--rows", help="comma-separated row names or shell patterns (default: all rows)")
    p.add_argument("--out", default="runs/experiments",
                   help="runs go to OUT/<experiment>-<scale>/runs (default runs/experiments)")
    p.add_argument("--figures-out", help="where table and figures go (default OUT/<experiment>-<scale>)")
    p.add_argument("--format", nargs="+", default=["png"], choices=["png", "pdf", "svg"])
    p.add_argument("--data-note", default="", help="a line about the data for the captions")
    p.add_argument("--replicates", type=int, default=2000, help="bootstrap replicates of the ordering "
                   "test over seeds and test images (default 2000)")
    p.add_argument("--device", help="--device for gradflow.train (default: its auto)")
    p.add_argument("--gpus", default="auto", help="'auto' (one run per visible GPU at once), 'none', "
                   "or ids like 0,1,2")
    p.add_argument("--jobs", type=int, default=1, help="concurrent runs without GPUs (default 1)")
    p.add_argument("--threads", type=int, help="CPU threads per run (OMP_NUM_THREADS)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--print-commands", action="store_true",
                   help="print one command per run (each skips/resumes by itself) and exit")
    g.add_argument("--collect", action="store_true",
                   help="only build the table and figures from the run folders")
    g.add_argument("--run", metavar="RUN", help="bring this one run (a run folder name) to its end")
    return p


def _plan(args):
    from gradflow.experiments import experiment_rows, make_scale, plan, select_rows
    scale = make_scale(args.scale, args.width, args.stop, args.probe_every, args.batch_size)
    rows = select_rows(experiment_rows(args.experiment),
                       [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None)
    exp_dir = Path(args.out) / f"{args.experiment}-{scale.name}"
    return scale, rows, plan(rows, args.seeds, exp_dir), exp_dir


def _needs_data(args) -> str:
    if not args.data:
        raise GradflowError("--data DIR is required to train: the folder with cifar-10-batches-py/ "
                            "(or the tarball)")
    if not Path(args.data).exists():
        raise GradflowError(f"--data {args.data!r} does not exist: pass the folder holding the CIFAR data")
    return str(Path(args.data).resolve())


def _self_command(args, argv: Sequence[str], run: str) -> str:
    keep, skip = [], False
    for a in argv:   # the user's flags, without the modes
        if skip:
            skip = False
            continue
        if a in ("--print-commands", "--collect"):
            continue
        if a == "--run":
            skip = True
            continue
        keep.append(a)
    return " ".join(shlex.quote(c) for c in [sys.executable, "-m", "gradflow", "experiment", *keep, "--run", run])


def _report(args, scale, rows, specs, exp_dir: Path, command: str, how: str = "") -> list[Path]:
    from gradflow.experiments import EXPERIMENTS, draw_figures, results_table, write_table
    from gradflow.experiments.ordering import ordering_lines
    from gradflow.cli.figures import _common
    out = Path(args.figures_out) if args.figures_out else exp_dir
    seeds = f"{args.seeds} seed(s) per row: {', '.join(str(s) for s in range(args.seeds))}"
    from gradflow.experiments import experiment_rows
    every = experiment_rows(args.experiment)
    picked = (f"rows: {len(rows)} of the experiment's {len(every)} ({', '.join(r.short for r in rows)}; "
              f"--rows {args.rows})" if len(rows) < len(every) else f"rows: all {len(rows)}")
    about = [EXPERIMENTS[args.experiment], picked, scale.describe(), seeds,
             f"data: {args.data or 'as recorded in the run folders'}" + (f" ({args.data_note})" if args.data_note else ""),
             f"run folders: {exp_dir / 'runs'}" + (f"; {how}" if how else ""),
             "error: the last logged test error of each run, in %; spread = max - min over seeds; "
             "paper error: He et al. 2016 (docs/theory.md, section 7.4), at the paper's scale"]
    common = _common(command)
    table = results_table(rows, specs, scale)
    about += ordering_lines(table, {r.name: r.group for r in rows})
    about += _claims(args, rows, specs)
    stem = f"{args.experiment}_{scale.name}_results"
    written = write_table(table, out, stem, f"{args.experiment} at {scale.name} scale", about + common)
    written += draw_figures(args.experiment, rows, specs, scale, out,
                            lambda name, lines: "\n".join(lines + about + common) + "\n", args.format)
    print(f"{PROG}: results in {out / stem}.md")
    return written


def _claims(args, rows, specs) -> list[str]:
    """The ordering test per panel: p under a random ordering, bootstrap over seeds and test images."""
    import math
    from gradflow.experiments.claims import claim_lines, ordering_claim
    from gradflow.experiments.results import row_runs
    runs = row_runs(rows, specs, args.data, args.verify, log=lambda m: print(f"{PROG}: {m}", file=sys.stderr))
    panels: dict = {}
    for r in rows:
        rr = runs.get(r.name)
        if rr is not None and rr.errors and not math.isnan(rr.paper):
            panels.setdefault(r.group, []).append(rr)
    lines = claim_lines({k: ordering_claim(v, args.replicates) for k, v in panels.items()})
    if not args.data:
        lines.append("per-image test results need --data (the test set): without it the bootstrap redraws "
                     "the seeds only")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(argv)
    command = " ".join(shlex.quote(c) for c in ["python", "-m", "gradflow", "experiment", *argv])
    try:
        from gradflow.experiments import command_for, device_slots, execute
        from gradflow.cli.args import check_flags
        check_flags(args, out_flags=("out", "figures_out"))
        scale, rows, specs, exp_dir = _plan(args)
        for r in rows:
            if r.missing:
                print(f"{PROG}: {r.name} cannot run: {r.missing}", file=sys.stderr)
        if args.collect:
            if not (exp_dir / "runs").is_dir():
                raise GradflowError(f"--collect: no run folders at {exp_dir / 'runs'}: run the sweep first, "
                                    "or pass the --out (and --scale) it was run with")
            _report(args, scale, rows, specs, exp_dir, command)
            return 0
        data = _needs_data(args)
        slots = device_slots(args.gpus, args.jobs)    # checked before commands are printed, too
        if args.device is not None:
            from gradflow.cli.args import resolve_device
            resolve_device(args.device)
        if args.print_commands:
            for spec in specs:
                print(_self_command(args, argv, spec.key))
            collect = [a for a in argv if a != "--print-commands"] + ["--collect"]
            print(f"# then: {shlex.join(['python', '-m', 'gradflow', 'experiment', *collect])}", file=sys.stderr)
            return 0
        if args.run:
            specs = [s for s in specs if s.key == args.run]
            if not specs:
                raise GradflowError(f"--run {args.run!r} is not a run of this sweep: see --print-commands")
        for s in specs:
            command_for(s, scale, data, args.verify)   # folder mismatches fail before anything runs
        if args.threads:
            slots = [{**s, "OMP_NUM_THREADS": str(args.threads)} for s in slots]
        t0 = time.perf_counter()
        print(f"{PROG}: {args.experiment}, {scale.describe()}, {len(specs)} run(s), "
              f"{len(slots)} at a time", flush=True)
        outcomes = execute(specs, scale, data, args.verify, slots, args.device, exp_dir / "logs",
                           lambda m: print(f"{PROG}: {m}", flush=True))
        wall = time.perf_counter() - t0
        print(f"{PROG}: sweep wall time {wall:.0f}s", flush=True)
        threads = f", OMP_NUM_THREADS={args.threads} each" if args.threads else ""
        how = (f"this sweep: {len(slots)} run(s) at a time{threads}, wall time {wall / 60:.1f} min "
               f"for {sum(o.action != 'skipped' for o in outcomes)} run(s) trained or resumed")
    except GradflowError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    bad = [o for o in outcomes if o.action == "error"]
    if any(o.returncode == 2 for o in bad):
        print(f"{PROG}: error: {bad[0].spec.key}: {bad[0].message}", file=sys.stderr)
        return 2
    if not args.run:
        _report(args, scale, rows, specs, exp_dir, command, how)
    if any(o.returncode in (130, 143) or "interrupted" in o.message for o in bad):
        return 130
    return 1 if bad else 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    sys.exit(main(argv))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli()
