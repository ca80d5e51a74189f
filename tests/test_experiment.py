"""python -m gradflow experiment: skip finished runs, resume interrupted ones, the results table
checked against the run logs read by hand, --print-commands, --collect, bad input.

Tiny runs on generated data: ResNet-20 at width 1/8, 3 seeds, batch 16, 8 iterations.
"""
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradflow.data.cifar import write_cifar
from gradflow.cli.experiment import main
from gradflow.experiments import command_for, experiment_rows, make_scale, plan, run_state, select_rows
from gradflow.experiments.planning import Scale

SCALE = ["--scale", "laptop", "--width", "0.125", "--stop", "8", "--batch-size", "16", "--probe-every", "4"]


def _exp(args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "gradflow", "experiment", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The depth row resnet20 with 3 seeds: seed 0 finished before the sweep, seed 1 interrupted
    at iteration 4, seed 2 not started; then the sweep runs."""
    root = tmp_path_factory.mktemp("exp")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, 64)
    write_cifar(root / "data", "cifar10", (x[:48], y[:48]), (x[48:], y[48:]))
    data, out = str(root / "data"), str(root / "out")
    args = ["depth", "--rows", "resnet20", "--seeds", "3", *SCALE, "--data", data, "--no-verify",
            "--out", out, "--device", "cpu", "--gpus", "none", "--threads", "1"]
    scale = make_scale("laptop", 0.125, 8, 4, 16)
    specs = plan(select_rows(experiment_rows("depth"), ["resnet20"]), 3, root / "out" / "depth-laptop")
    before = {}
    for spec, halt in ((specs[0], []), (specs[1], ["--halt-at", "4"])):
        cmd = command_for(spec, scale, data, False, "cpu") + halt
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode in (0, 1, 75), done.stderr[-2000:]   # 1: finished above 20% error; 75: halted
        before[spec.key] = (spec.folder / "log.jsonl").read_bytes()
    assert run_state(specs[0].folder) == "finished" and run_state(specs[1].folder) == "resumable"
    ran = _exp(args)
    return dict(root=root, args=args, specs=specs, before=before, ran=ran, data=data, out=out)


def test_sweep_skips_finished_and_resumes_interrupted(sweep):
    ran, specs = sweep["ran"], sweep["specs"]
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert f"{specs[0].key}: finished before, skipped" in ran.stdout
    assert (specs[0].folder / "log.jsonl").read_bytes() == sweep["before"][specs[0].key]   # not redone
    assert not (specs[0].folder.parent.parent / "logs" / f"{specs[0].key}.out").exists()
    out = (specs[1].folder.parent.parent / "logs" / f"{specs[1].key}.out").read_text()
    assert "--resume" in out and "--preset" not in out and "--model" not in out
    its = [r["iteration"] for r in _log(specs[1].folder)]
    assert its == sorted(set(its)) and its[-1] == 8   # continued, each row once
    rows_before = [json.loads(line) for line in sweep["before"][specs[1].key].decode().splitlines()]
    assert _log(specs[1].folder)[:len(rows_before)] == rows_before   # the first half kept as it was
    for spec in specs:
        assert run_state(spec.folder) == "finished"
        cfg = json.loads((spec.folder / "config.json").read_text())["config"]
        assert cfg["model_options"]["width"] == 0.125 and cfg["stop"] == 8 and cfg["seed"] == spec.seed
        assert cfg["milestones"] == [4, 6] and cfg["batch_size"] == 16


def test_table_median_and_spread_match_the_logs(sweep):
    exp_dir = Path(sweep["out"]) / "depth-laptop"
    table = pd.read_csv(exp_dir / "depth_laptop_results.csv")
    assert list(table["row"]) == ["depth-resnet20"]
    for row in table.itertuples():
        errors = []
        for seed in (0, 1, 2):
            rows = _log(exp_dir / "runs" / f"{row.row}-seed{seed}")
            errors.append(100 * [r["test_error"] for r in rows if r["test_error"] is not None][-1])
        assert math.isclose(row.median_error, round(statistics.median(errors), 2), abs_tol=0.006)
        assert math.isclose(row.spread, round(max(errors) - min(errors), 2), abs_tol=0.011)
        assert math.isclose(row.min_error, round(min(errors), 2), abs_tol=0.006)
        assert row.seeds_finished == 3 and row.scale == "laptop" and row.iterations == 8
    assert table["paper_error"].isna().all()   # the paper has no ResNet-20 number
    md = (exp_dir / "depth_laptop_results.md").read_text()
    assert "laptop scale (width x0.125, 8 iterations at batch 16 (not the paper's 128)" in md
    assert "| depth-resnet20 | - |" in md and "git commit" in md


def test_figures_and_captions(sweep):
    exp_dir = Path(sweep["out"]) / "depth-laptop"
    for stem in ("depth_laptop_training_curves", "depth_laptop_gradient_flow_resnet20"):
        assert (exp_dir / f"{stem}.png").stat().st_size > 1000
        caption = (exp_dir / f"{stem}.txt").read_text()
        assert "laptop scale" in caption and "command: python -m gradflow experiment depth" in caption
    assert "Probed iterations: 0, 4" in (exp_dir / "depth_laptop_gradient_flow_resnet20.txt").read_text()


def test_print_commands_then_collect(sweep, capsys):
    assert main(sweep["args"] + ["--print-commands"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all("--run" in ln for ln in lines)
    assert [shlex.split(ln)[-1] for ln in lines] == [s.key for s in sweep["specs"]]
    one = subprocess.run(shlex.split(lines[2]), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and "finished before, skipped" in one.stdout   # idempotent in an array
    exp_dir = Path(sweep["out"]) / "depth-laptop"
    for f in exp_dir.glob("depth_laptop_*"):
        f.unlink()
    assert main(["depth", "--rows", "resnet20", "--seeds", "3", *SCALE, "--out", sweep["out"], "--collect"]) == 0
    assert pd.read_csv(exp_dir / "depth_laptop_results.csv")["seeds_finished"].tolist() == [3]
    assert (exp_dir / "depth_laptop_training_curves.png").exists()


def test_a_folder_from_another_scale_is_refused(sweep, capsys):
    args = [a if a != "8" else "12" for a in sweep["args"]]   # --stop 12 over runs made with 8
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "stop=8" in err and "--out" in err and len(err.splitlines()) == 1


def test_a_folder_from_before_the_linear_warmup_is_refused(sweep, capsys):
    """A laptop run folder made with the held warm-up (configs written before warmup_shape existed)
    is another recipe: collecting it beside the ramped runs would mix two recipes in one row."""
    config = sweep["specs"][0].folder / "config.json"
    text = config.read_text()
    saved = json.loads(text)
    saved["config"].pop("warmup_shape")
    config.write_text(json.dumps(saved))
    try:
        assert main(sweep["args"]) == 2
        err = capsys.readouterr().err
        assert "warmup_shape='constant' (this experiment: 'linear')" in err and "--out" in err
    finally:
        config.write_text(text)


@pytest.mark.parametrize("args,words", [
    (["table9", "--data", "x"], "invalid choice"),
    (["table2", "--seeds", "0", "--data", "."], "seeds=0 (--seeds)"),
    (["table2", "--scale", "huge", "--data", "."], "unknown scale 'huge'"),
    (["table2", "--rows", "nope", "--data", "."], "matches no row"),
    (["table2", "--data", "/no/such/folder"], "does not exist"),
    (["table2", "--width", "0", "--data", "."], "--width 0"),
    (["table2", "--gpus", "a,b", "--data", "."], "--gpus"),
])
def test_bad_input_one_line_exit_2(args, words, capsys):
    rc = main(args) if args[0] != "table9" else None
    if rc is None:
        with pytest.raises(SystemExit) as e:
            main(args)
        rc = e.value.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


def test_bad_input_through_the_module(tmp_path):
    done = _exp(["table1", "--data", str(tmp_path / "missing")])
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("gradflow experiment: error")


def test_rows_and_paper_numbers_come_from_the_presets():
    t1 = {r.short: r for r in experiment_rows("table1")}
    assert t1["exclusive-gate-b-6"].paper_error == "8.70" and t1["shortcut-gate-b0"].paper_error == "12.86"
    t3 = experiment_rows("table3")
    assert any(r.missing for r in t3)   # 1-layer skips: listed, not run
    assert [r.model for r in experiment_rows("fig1")] == ["resnet1001", "resnet1001"]
    assert [r.paper_error for r in experiment_rows("depth")][-1] == "4.92"


def test_a_run_another_process_holds_is_left_to_it(tmp_path):
    import socket
    from gradflow.experiments import execute
    from gradflow.experiments.runner import _lock
    scale = make_scale("laptop", 0.125, 8, 4, 16)
    spec = plan(select_rows(experiment_rows("depth"), ["resnet20"]), 1, tmp_path)[0]
    lock = spec.folder.parent / f".{spec.key}.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{socket.gethostname()}:{os.getpid()}")   # a live process holds it
    logged = []
    [out] = execute([spec], scale, str(tmp_path), False, [{}], "cpu", tmp_path / "logs", logged.append)
    assert out.action == "error" and "held by" in out.message and "left to it" in logged[0]
    assert not spec.folder.exists()                            # nothing started
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{socket.gethostname()}:{dead.pid}")      # its process is gone: stale
    assert _lock(spec) is None and lock.read_text().endswith(f":{os.getpid()}")


def test_laptop_schedule_keeps_the_paper_shape_with_a_warmup_floor():
    """Milestones at 50% and 75% of the run (the paper's 32k/48k of 64k); the warm-up is a linear ramp
    over 1/4 of the run (a step count the net needs, not the paper's 400/64k fraction), never longer
    than the paper's 400, and the scale's description says it is not the paper's."""
    paper = make_scale("paper").fields()
    assert paper == {"probe_every": 4000}                  # the paper scale changes nothing but probes
    laptop = make_scale("laptop")
    f = laptop.fields()
    assert (laptop.width, f["stop"]) == (0.5, 400)
    assert f["milestones"] == (200, 300)
    assert (f["warmup_iters"], f["warmup_shape"]) == (400 // 4, "linear")
    assert "ramped linearly from 0.01 to 0.1 over 100 iterations" in laptop.describe()
    assert make_scale("laptop", stop=1600).fields()["warmup_iters"] == 1600 // 4
    assert make_scale("laptop", stop=32000).fields()["warmup_iters"] == 400   # never longer than the paper's
    held = Scale("laptop", 0.5, 400)                       # the constant warm-up keeps the 1/8 floor
    assert (held.fields()["warmup_iters"], held.fields()["warmup_shape"]) == (50, "constant")
    assert "recipe shape)" in held.describe()


def test_several_at_a_time_start_the_deepest_runs_first(tmp_path):
    """Table 2 lists ResNet-110 rows before ResNet-164 ones; with two slots the 164s go first, each
    column in the table's order, so the sweep does not end on a long straggler."""
    from gradflow.experiments.runner import longest_first
    specs = plan(experiment_rows("table2"), 2, tmp_path)
    ordered = longest_first(specs)
    depths = [int(s.row.model.rsplit("resnet", 1)[1]) for s in ordered]
    assert depths == sorted(depths, reverse=True) and depths[0] == 164 and depths[-1] == 110
    for d in (110, 164):
        assert [s.key for s in ordered if s.row.model.endswith(str(d))] == \
            [s.key for s in specs if s.row.model.endswith(str(d))]
