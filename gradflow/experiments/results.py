"""An experiment's results: the table (median and spread of the final test error beside the
paper's number, diverged runs flagged) as CSV and Markdown, the rows' runs for the ordering claims,
and the paper-style figures, all from run folders alone.

A run that diverged (a NaN/Inf loss, or a loss spike it never recovered from: see
:mod:`gradflow.experiments.divergence`) counts at chance error, the error of a network whose
outputs are NaN or constant, and is named in the ``diverged`` column and the figure's legend.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from gradflow.utils.io import atomic_write_text
from gradflow.runs.read import Run, read_run
from gradflow.experiments.planning import Row, RunSpec, Scale
from gradflow.experiments.runner import check_folder, run_state
from gradflow.experiments.divergence import divergence

COLUMNS = ("row", "model", "options", "dataset", "scale", "width", "iterations", "paper_error",
           "seeds_planned", "seeds_finished", "median_error", "min_error", "max_error", "spread",
           "median_train_loss", "statuses", "note", "diverged", "per_seed")


def final_error(run: Run) -> Optional[float]:
    """The last logged test error of a run, as a fraction (None if it never evaluated)."""
    log = run.log
    if "test_error" not in log:
        return None
    errs = log.dropna(subset=["test_error"])
    return float(errs["test_error"].iloc[-1]) if len(errs) else None


def _final_loss(run: Run) -> Optional[float]:
    log = run.log.dropna(subset=["train_loss"]) if "train_loss" in run.log else run.log.iloc[:0]
    return float(log["train_loss"].iloc[-1]) if len(log) else None


def _pct(v: Optional[float]) -> Optional[float]:
    return None if v is None or not math.isfinite(v) else round(100 * v, 2)


def _classes(row: Row) -> int:
    return 100 if row.dataset == "cifar100" else 10


def results_table(rows: list[Row], specs: list[RunSpec], scale: Scale) -> pd.DataFrame:
    """One line per row: median, min, max and spread (max - min) of the final test error in %,
    over the row's finished runs, a diverged run counted at chance (named in ``diverged``);
    ``per_seed`` lists each seed's error."""
    lines = []
    for row in rows:
        mine = [s for s in specs if s.row.name == row.name]
        errors, losses, statuses, diverged, per_seed = [], [], [], [], []
        chance = 1 - 1 / _classes(row)
        for s in mine:
            check_folder(s, scale)   # a folder from another scale is an error, not a result
            if run_state(s.folder) != "finished":
                statuses.append(run_state(s.folder))
                continue
            run = read_run(s.folder)
            statuses.append(run.status.get("status", "?"))
            div = divergence(run.log, _classes(row), run.status)
            err = chance if div.diverged else final_error(run)
            if div.diverged:
                diverged.append(f"seed {s.seed}: {div.text}")
            if err is None:
                continue
            errors.append(err)
            per_seed.append(f"{s.seed}: {100 * err:.2f}" + (" (diverged)" if div.diverged else ""))
            loss = None if div.diverged else _final_loss(run)
            if loss is not None:
                losses.append(loss)
        note = row.missing and f"not run: {row.missing}" or ""
        if mine and len(errors) < len(mine) and not note:
            note = f"{len(mine) - len(errors)} of {len(mine)} runs without a final test error"
        counts = {k: statuses.count(k) for k in dict.fromkeys(statuses)}
        lines.append(dict(
            row=row.name, model=row.model, options=", ".join(f"{k}={v}" for k, v in row.options.items()),
            dataset=row.dataset, scale=scale.name, width=scale.width, iterations=scale.stop,
            paper_error=row.paper_error, seeds_planned=len(mine), seeds_finished=len(errors),
            median_error=_pct(statistics.median(errors)) if errors else None,
            min_error=_pct(min(errors)) if errors else None, max_error=_pct(max(errors)) if errors else None,
            spread=_pct(max(errors) - min(errors)) if errors else None,
            median_train_loss=round(statistics.median(losses), 4) if losses else None,
            statuses=", ".join(f"{k} x{v}" for k, v in counts.items()), note=note,
            diverged=(f"{len(diverged)} of {len(errors)}: " + "; ".join(diverged)) if diverged else "",
            per_seed=", ".join(per_seed)))
    return pd.DataFrame(lines, columns=list(COLUMNS))


def row_runs(rows: list[Row], specs: list[RunSpec], data: Optional[str] = None, verify: bool = False,
             log: Callable[[str], None] = print) -> dict:
    """{row name: :class:`gradflow.experiments.claims.RowRuns`}: each row's finished runs for the
    ordering claims (error % per run, a diverged run at chance), with per-image test results where
    ``data`` lets them be recomputed from the final checkpoints (cached as ``test_correct.npy``)."""
    from gradflow.errors import GradflowError
    from gradflow.experiments.claims import RowRuns
    from gradflow.experiments.ordering import paper_rank
    from gradflow.experiments.test_images import per_image_correct, read_correct
    out, problems = {}, []
    for row in rows:
        paper = paper_rank(row.paper_error)
        rr = RowRuns(row.name, paper if paper is not None else float("nan"), chance=100 * (1 - 1 / _classes(row)))
        for s in sorted((s for s in specs if s.row.name == row.name), key=lambda s: s.seed):
            if run_state(s.folder) != "finished":
                continue
            run = read_run(s.folder)
            div = divergence(run.log, _classes(row), run.status)
            err = final_error(run)
            if not div.diverged and err is None:
                continue
            rr.errors.append(rr.chance if div.diverged else 100 * err)
            correct = read_correct(s.folder)
            if correct is None and data and not div.diverged:
                try:
                    correct = per_image_correct(s.folder, data, verify)
                except (GradflowError, OSError, RuntimeError) as e:
                    problems.append(f"{s.key}: {e}")
            if correct is not None and not div.diverged and abs(100 * (1 - correct.mean()) - 100 * err) > 1:
                problems.append(f"{s.key}: the per-image results give {100 * (1 - correct.mean()):.2f}% against the "
                                f"logged {100 * err:.2f}% (float32 here; the run's own precision in training)")
            rr.correct.append(None if div.diverged else correct)   # a diverged run stays at chance
        out[row.name] = rr
    for p in problems:
        log(f"per-image test results: {p}")
    return out


def _cell(v) -> str:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def markdown(table: pd.DataFrame, title: str, about: list[str]) -> str:
    """The results table as Markdown, under a title and the lines that say what was run."""
    cols = ["row", "paper_error", "median_error", "min_error", "max_error", "spread",
            "seeds_finished", "seeds_planned", "median_train_loss", "statuses", "diverged", "per_seed", "note"]
    heads = ["row", "paper error %", "median error %", "min %", "max %", "spread (max-min)",
             "seeds done", "seeds planned", "median final train loss", "statuses", "diverged (counted at chance)",
             "error per seed %", "note"]
    out = [f"# {title}", ""] + [f"- {a}" for a in about] + [""]
    out += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for _, r in table.iterrows():
        out.append("| " + " | ".join(_cell(r[c]) for c in cols) + " |")
    return "\n".join(out) + "\n"


def write_table(table: pd.DataFrame, out: Path, stem: str, title: str, about: list[str]) -> list[Path]:
    """``<stem>.csv`` and ``<stem>.md`` in ``out`` (atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / f"{stem}.csv", out / f"{stem}.md"
    atomic_write_text(csv, table.to_csv(index=False))
    atomic_write_text(md, markdown(table, title, about))
    return [csv, md]


def curve_runs(rows: list[Row], specs: list[RunSpec]) -> dict[str, Run]:
    """{row label: the run of its lowest seed that has a log} (the run drawn in the curve figures)."""
    out = {}
    for row in rows:
        for s in sorted((s for s in specs if s.row.name == row.name), key=lambda s: s.seed):
            if s.folder.exists() and (s.folder / "config.json").exists():
                run = read_run(s.folder, row.short)
                if not run.log.empty:
                    div = divergence(run.log, _classes(row), run.status)
                    if div.diverged:      # the legend says so (the label is the curve's name)
                        run = read_run(s.folder, f"{row.short} (diverged)")
                    out[row.short] = run
                    break
    return out


def _about(run: Run) -> str:
    """A run in one line: folder, status, final test error, its training time, device, code."""
    err = final_error(run)
    wall = run.log["wall_time"].dropna() if "wall_time" in run.log else run.log.iloc[:0]
    code = run.config.get("code", {})
    commit = (code.get("git_commit") or "unknown")[:10] + (" with uncommitted changes" if code.get("git_dirty") else "")
    return (f"{run.path} ({run.status.get('status', 'unfinished')}, final test error "
            f"{'-' if err is None else f'{100 * err:.2f}%'}, {float(wall.iloc[-1]) / 60 if len(wall) else float('nan'):.1f} "
            f"min wall time at its last log row, device {run.device or '?'}, trained by gradflow git commit {commit})")


def draw_figures(name: str, rows: list[Row], specs: list[RunSpec], scale: Scale, out: Path,
                 caption: Callable[[str, list[str]], str], formats=("png",),
                 log: Callable[[str], None] = print) -> list[Path]:
    """Training curves (Fig. 1/3/6 style) and gradient flow over training, with a caption each.

    ``caption(figure_name, lines)`` returns a figure's caption text.
    """
    import matplotlib
    matplotlib.use("Agg")
    from gradflow import plot
    from gradflow.plot.style import save_figure
    runs = curve_runs(rows, specs)
    written: list[Path] = []
    if not runs:
        log(f"{name}: no run has a log yet: no figures")
        return written
    label = f"{name}, {scale.name} scale: width x{scale.width:g}, {scale.stop:,} iterations"
    groups: dict[str, list[str]] = {}
    for row in rows:
        if row.short in runs:
            groups.setdefault(row.group or name, []).append(row.short)
    stem = f"{name}_{scale.name}_training_curves"
    if name == "table1" and "original" in runs and len(runs) > 1:
        fig = plot.training_curve_panels(list(runs.values()), baseline="original", ncols=3,
                                         title=f"Table 1 variants vs identity shortcut ({label})")
    elif len(groups) > 1:
        fig = plot.training_curve_panels(list(runs.values()), panels=groups, ncols=2,
                                         title=f"Training curves ({label})")
    else:
        fig = plot.training_curves(list(runs.values()), title=f"Training curves ({label})")
    written += save_figure(fig, out, stem, formats)
    seeds = sorted({s.seed for s in specs})
    atomic_write_text(out / f"{stem}.txt", caption(stem, [
        f"{stem}: training loss (dashed, left axis) and test error (solid, right axis) against iterations; "
        f"one run per row (its lowest seed, seed {seeds[0] if seeds else '?'}).", "runs:"]
        + [f"  {k}: {_about(r)}" for k, r in runs.items()]))
    for short, run in runs.items():
        if run.probe.empty:
            continue
        fstem = f"{name}_{scale.name}_gradient_flow_{short}"
        fig = plot.gradient_flow_over_training(run.probe, title=f"Gradient flow over training: {short} ({label})")
        written += save_figure(fig, out, fstem, formats)
        its = sorted(run.probe["iteration"].unique())
        atomic_write_text(out / f"{fstem}.txt", caption(fstem, [
            f"{fstem}: top, log10 of the batch-mean ||dE/dx_l|| / ||dE/dx_L|| per unit at each probed "
            "training step; bottom, its fitted decay rate per unit toward the input (and the direct "
            f"term's), 95% band. Probed iterations: {', '.join(map(str, its))}.",
            f"run: {_about(run)}"]))
    log(f"{name}: {len(written)} figure file(s) in {out}")
    return written
