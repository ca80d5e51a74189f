"""Run folders a fault left behind: started over, resumed, or refused in one line.

The faults happen as a trial made them: the trainer is stopped at a chosen moment by a
test hook (an exception that, like SIGKILL, lets nothing after it run), or a write
fails with an injected ENOSPC. Tiny runs: resnet20 on 32 generated images, batch 4.
"""
import errno
import json
import subprocess
import sys
import os

import pandas as pd
import pytest
import torch

from gradflow import GradflowError
from gradflow.data.cifar import synthetic_cifar
from gradflow.runs import checkpoint as ckpt_mod
from gradflow.runs.folder import RUN_FILES
from gradflow.runs.layout import FILES
from gradflow.runs.log import RunLog, read_log
from gradflow.training import resolve, resume_config, run_training
from gradflow.training import steps as steps_mod

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}


class Killed(BaseException):
    """What the hook raises: like SIGKILL, nothing of the trainer's runs after it (no status, no cleanup)."""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    synthetic_cifar(root, n_train=32, n_test=8)
    return root


def tiny(data, out, **kw):
    base = dict(model="resnet20", data=str(data), verify_data=False, batch_size=4, stop=4,
                warmup_iters=0, lr=0.05, milestones=(), log_every=2, eval_every=4,
                checkpoint_every=100, out_dir=str(out), run_name="run", progress=False, device="cpu",
                deterministic=True, fail_error=1.0, amp="none")
    return resolve(**{**base, **kw})


def kill_at(monkeypatch, module, name, when=lambda *a, **k: True):
    """Make ``module.name`` raise Killed when ``when(*args)`` holds: the run stops right there."""
    real = getattr(module, name)

    def hooked(*args, **kwargs):
        if when(*args, **kwargs):
            raise Killed(name)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, hooked)


def test_every_file_the_run_log_writes_is_a_run_file(tmp_path):
    log = RunLog(tmp_path)
    written = {p.name for p in (log.jsonl, log.csv, log.probe, log.paths)}
    assert written <= set(RUN_FILES) and set(FILES.values()) == set(RUN_FILES)


@pytest.mark.slow
def test_starting_over_a_run_killed_before_its_first_checkpoint_keeps_one_paths_table(data, tmp_path,
                                                                                      monkeypatch):
    cfg = tiny(data, tmp_path, probe_every=2, probe_paths=2)
    clean = run_training(tiny(data, tmp_path, probe_every=2, probe_paths=2, run_name="clean")).run_dir
    per_probe = pd.read_csv(clean / "paths.csv").groupby("iteration").size()
    with monkeypatch.context() as m:
        # killed at the first checkpoint (the last iteration's): every row is on disk, no checkpoint
        kill_at(m, steps_mod, "save_checkpoint")
        with pytest.raises(Killed):
            run_training(cfg)
    run = tmp_path / "run"
    assert (run / "paths.csv").exists() and not (run / "checkpoint.pt").exists()
    out = run_training(cfg)                      # the same command again
    assert out.status == "ok" and "paths.csv" in RUN_FILES
    again = pd.read_csv(run / "paths.csv").groupby("iteration").size()
    assert again.to_dict() == per_probe.to_dict()  # not twice the rows of a clean run


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "killed-mid-write", "enospc"])
def test_a_folder_left_before_config_json_is_written_is_started_over(data, tmp_path, monkeypatch, fault):
    cfg = tiny(data, tmp_path)
    with monkeypatch.context() as m:
        if fault == "enospc":
            def full(path, obj):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            m.setattr(steps_mod, "write_json", full)
            with pytest.raises(OSError):
                run_training(cfg)
        else:
            kill_at(m, steps_mod, "write_json", lambda path, obj: path.name == "config.json")
            with pytest.raises(Killed):
                run_training(cfg)
    run = tmp_path / "run"
    if fault == "killed-mid-write":
        (run / ".config.json.x1y2.tmp").write_text('{"conf')
    assert run.is_dir() and not (run / "config.json").exists()
    with pytest.raises(GradflowError, match="without --resume"):
        resume_config(run)
    out = run_training(cfg)
    assert out.status == "ok" and [r["iteration"] for r in read_log(run)] == [2, 4]
    assert json.loads((run / "config.json").read_text())["config"]["stop"] == 4


def test_a_folder_with_other_files_is_not_taken_over(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(GradflowError, match="already exists"):
        run_training(tiny(data, tmp_path))
    assert (run / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_resume_rewrites_a_damaged_config_json_and_figures_name_a_damaged_one(data, tmp_path):
    run = run_training(tiny(data, tmp_path, halt_at=2)).run_dir
    good = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text("{not json")
    from gradflow.runs.read import read_run
    with pytest.raises(GradflowError, match="config.json is damaged"):
        read_run(run)
    out = run_training(resume_config(run), resume=run)
    assert out.status == "ok"
    rewritten = json.loads((run / "config.json").read_text())["config"]
    assert {**rewritten, "halt_at": 2} == good["config"]   # the resumed run's halt_at is its own


@pytest.mark.slow
def test_resume_of_a_checkpoint_outside_a_run_folder_is_refused_and_writes_nothing(data, tmp_path):
    run = run_training(tiny(data, tmp_path, halt_at=2)).run_dir
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "model.pt").write_bytes((run / "checkpoint.pt").read_bytes())
    cmd = [sys.executable, "-m", "gradflow", "train", "--resume", str(loose / "model.pt"), "--no-progress"]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "outside a run folder" in out.stderr, out.stderr[-1500:]
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in loose.iterdir()) == ["model.pt"]


def _rewrite(path, change):
    ck = ckpt_mod.read_checkpoint(path)
    change(ck)
    ck.pop("format")
    ckpt_mod.save_checkpoint(path, ck)   # a valid digest over content that does not fit


@pytest.mark.slow
@pytest.mark.parametrize("part", ["model_state", "optimizer", "rng"])
def test_a_checkpoint_whose_content_does_not_fit_is_one_line_exit_2(data, tmp_path, part):
    run = run_training(tiny(data, tmp_path, halt_at=2)).run_dir

    def change(ck):
        if part == "model_state":
            key = next(k for k in ck["model_state"] if k.endswith("weight"))
            ck["model_state"][key] = torch.zeros(3, 3)
        elif part == "optimizer":
            for s in ck["optimizer"]["state"].values():
                s["momentum_buffer"] = torch.zeros(2)
        else:
            ck["rng"] = [{"cpu": torch.zeros(5, dtype=torch.uint8)}]
    _rewrite(run / "checkpoint.pt", change)
    before = (run / "status.json").read_text()
    cmd = [sys.executable, "-m", "gradflow", "train", "--resume", str(run), "--no-progress"]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-1500:]
    assert "does not fit its model" in out.stderr and "Traceback" not in out.stderr
    assert (run / "status.json").read_text() == before
    if part == "model_state":
        import gradflow
        with pytest.raises(GradflowError, match="does not fit its model"):
            gradflow.load_checkpoint(run)
        for command in (["probe", "--checkpoint", str(run)], ["lesion", "--checkpoint", str(run)]):
            out = subprocess.run([sys.executable, "-m", "gradflow", *command, "--out", str(tmp_path / "o")],
                                 env=ENV, capture_output=True, text=True, timeout=120)
            assert out.returncode == 2 and "does not fit its model" in out.stderr, out.stderr[-1500:]
            assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_train_says_a_run_inside_the_warm_up_and_why_it_exits_1(data, tmp_path, capsys):
    from gradflow.cli.train import get_args_parser, main
    args = get_args_parser().parse_args(
        ["--model", "resnet20", "--data", str(data), "--no-verify", "--device", "cpu", "--batch-size", "4",
         "--stop", "4", "--warmup-iters", "400", "--milestones", "", "--log-every", "2", "--eval-every", "4",
         "--fail-error", "0", "--amp", "none", "--out-dir", str(tmp_path), "--run-name", "run",
         "--no-progress"])
    assert main(args) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert "inside the 400-iteration warm-up" in err
    assert "above --fail-error 0" in err and "status fail" in err
