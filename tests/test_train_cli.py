"""The trainer as a program: torchrun with two CPU processes (gloo), and SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from gradflow.data.cifar import synthetic_cifar
from gradflow.runs.log import read_log

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    synthetic_cifar(root, n_train=640, n_test=128)
    return root


def _flags(data, out, *extra):
    return ["--model", "resnet20", "--data", str(data), "--no-verify", "--smoke", "--device", "cpu",
            "--out-dir", str(out), "--run-name", "run", "--no-progress", *extra]


def test_torchrun_two_processes_train_and_write_one_set_of_logs(data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "gradflow", "train",
           *_flags(data, tmp_path, "--stop", "20", "--lr", "0.05", "--warmup-iters", "0",
                   "--milestones", "", "--eval-every", "20", "--probe-every", "10")]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("run folder") == 1  # rank 0 speaks
    runs = list(tmp_path.iterdir())
    assert [p.name for p in runs] == ["run"]
    run = runs[0]
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoint.pt", "config.json", "log.csv",
                                                     "log.jsonl", "probe.csv", "status.json"]
    # the probes record the global batch (32 samples, 16 from each process), said once
    probe = pd.read_csv(run / "probe.csv")
    assert sorted(set(probe["iteration"])) == [0, 10] and (probe["batch"] == 32).all()
    assert out.stderr.count("each probe records the global batch") == 1
    rows = read_log(run)
    assert [r["iteration"] for r in rows] == [5, 10, 15, 20]  # one row each, not one per process
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert rows[-1]["test_error"] < 0.2 and rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_sigterm_saves_a_checkpoint_and_resume_continues(data, tmp_path):
    cmd = [sys.executable, "-m", "gradflow", "train",
           *_flags(data, tmp_path, "--stop", "100000", "--log-every", "2", "--checkpoint-every", "1000")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-3000:]  # interrupted by SIGTERM, not finished
    assert "stopped by SIGTERM" in stdout
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "interrupted" and status["iteration"] >= 4

    step = status["iteration"]
    cmd = [sys.executable, "-m", "gradflow", "train", "--resume", str(tmp_path / "run"),
           "--halt-at", str(step + 3), "--no-progress"]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 75, out.stderr[-3000:]  # stopped by --halt-at
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["iteration"] == step + 3
    iters = [r["iteration"] for r in read_log(tmp_path / "run")]
    assert iters == list(range(2, iters[-1] + 1, 2)) and iters[-1] >= step
