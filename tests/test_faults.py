"""Fault injection: crafted and corrupt files, signals, a second process, a full disk, bad flags.

Each test makes the fault happen and checks the run folder against what an
uninterrupted run, the file's own bytes or the user's umask say it must hold.
Tiny runs: resnet20 on 32 generated images, batch 4.
"""
import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

import gradflow
from gradflow import GradflowError
from gradflow.cli import args as gcli
from gradflow.data.cifar import DeviceCifar, load_cifar, synthetic_cifar, write_cifar
from gradflow.training import TrainingDiverged, resolve, resume_config, run_training, train
from gradflow.runs import log as runlog_mod
from gradflow.training import steps as steps_mod
from gradflow.runs.checkpoint import read_checkpoint, save_checkpoint
from gradflow.runs.folder import holder as lock_holder
from gradflow.runs.log import TIMING, RunLog, read_log

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    synthetic_cifar(root, n_train=32, n_test=8)
    return root


@pytest.fixture(scope="module")
def whole(data, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with (tiny() as it is)."""
    return train(tiny(data, tmp_path_factory.mktemp("whole")))


def tiny(data, out, **kw):
    """8 iterations an epoch (32 images, batch 4): a log row every 2, a checkpoint every 4."""
    base = dict(model="resnet20", data=str(data), verify_data=False, batch_size=4, stop=8,
                warmup_iters=0, lr=0.05, milestones=(), log_every=2, eval_every=4,
                checkpoint_every=4, out_dir=str(out), run_name="run", progress=False, device="cpu",
                deterministic=True, fail_error=1.0)  # 8 steps learn little: "ok" unless a test says
    return resolve(**{**base, **kw})


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def status(run):
    return json.loads((run / "status.json").read_text())


def train_flags(data, out, *extra):
    return ["--model", "resnet20", "--data", str(data), "--no-verify", "--device", "cpu",
            "--batch-size", "4", "--warmup-iters", "0", "--milestones", "", "--log-every", "1",
            "--eval-every", "1000", "--checkpoint-every", "1000", "--stop", "100000", "--fail-error", "1",
            "--out-dir", str(out), "--run-name", "run", "--no-progress", *extra]


def wait_for_rows(path, n, proc, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {n} rows (process rc={proc.poll()})")


# --- 1. loading never runs code -----------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": "gradflow-checkpoint/1", "model": "resnet20", "x": _RunsCode(marker)},
               tmp_path / "checkpoint.pt")
    for load in (read_checkpoint, gradflow.load_checkpoint):
        with pytest.raises(GradflowError, match="refused to load.*system"):
            load(tmp_path)
    from gradflow.cli.probe import main as probe_main
    from gradflow.cli.train import get_args_parser, main as train_main
    assert train_main(get_args_parser().parse_args(["--resume", str(tmp_path), "--no-progress"])) == 2
    assert probe_main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    assert not marker.exists()


def test_a_crafted_cifar_file_is_refused_by_train_and_probe(tmp_path):
    synthetic_cifar(tmp_path, n_train=10, n_test=10)
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "test_batch").write_bytes(pickle.dumps({"data": _RunsCode(marker), "labels": [0]}, protocol=2))
    with pytest.raises(GradflowError, match="refused to unpickle 'test_batch'.*system.*does not contain"):
        load_cifar("cifar10", tmp_path, verify=False)
    from gradflow.probe.inputs import cifar_test
    with pytest.raises(GradflowError, match="refused to unpickle 'test_batch'.*system"):
        cifar_test(str(tmp_path), 4, 1, 32)
    assert not marker.exists()


def test_a_flipped_byte_in_a_weight_tensor_is_refused(tmp_path):
    model = gradflow.create_model("resnet20")
    name, weight = max(model.state_dict().items(), key=lambda kv: kv[1].numel())
    path = save_checkpoint(tmp_path / "checkpoint.pt", dict(model="resnet20", options={},
                                                            model_state=model.state_dict(), step=1))
    gradflow.load_checkpoint(path)  # intact: loads
    raw = bytearray(path.read_bytes())
    at = raw.find(weight.numpy().tobytes())  # the tensor's own bytes, found in the file
    assert at > 0
    raw[at + 16: at + 32] = bytes(b ^ 0xFF for b in raw[at + 16: at + 32])
    path.write_bytes(bytes(raw))
    loaded = torch.load(path, weights_only=True)  # torch alone takes it without a word...
    assert not torch.equal(loaded["model_state"][name], weight)
    with pytest.raises(GradflowError, match="damaged.*SHA-256"):  # ...gradflow does not
        gradflow.load_checkpoint(path)
    for junk in (bytes(raw[: len(raw) // 2]), b"not a checkpoint at all"):  # truncated; foreign
        path.write_bytes(junk)
        with pytest.raises(GradflowError, match="cannot read checkpoint.*damaged or not a checkpoint"):
            gradflow.load_checkpoint(path)


# --- 10. data that is not CIFAR's uint8 images ------------------------------------------------------

@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_an_empty_cifar_file_is_said_to_be_empty_not_crafted(tmp_path, protocol):
    """An empty uint8 array pickles through bytes() (protocol 2) or numpy's _frombuffer (5)."""
    write_cifar(tmp_path, "cifar10", (np.zeros((10, 3, 32, 32), np.uint8), np.zeros(10, int)),
                (np.zeros((5, 3, 32, 32), np.uint8), np.zeros(5, int)))
    blob = pickle.dumps({"data": np.zeros((0, 3072), np.uint8), "labels": []}, protocol=protocol)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(blob)
    with pytest.raises(GradflowError, match=r"'test_batch' .* holds no images \(data is \[0, 3072\]\)") as e:
        load_cifar("cifar10", tmp_path, verify=False)
    assert "crafted" not in str(e.value)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_cifar_file_pickled_with_any_protocol_loads_exactly(tmp_path, protocol):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 3072), dtype=np.uint8)
    blob = pickle.dumps({"data": x, "labels": [1, 2, 3, 4, 5]}, protocol=protocol)
    from gradflow.data.cifar import read_cifar_file
    images, labels = read_cifar_file(blob, "test_batch", "labels", tmp_path)
    assert np.array_equal(images.numpy().reshape(5, 3072), x) and labels.tolist() == [1, 2, 3, 4, 5]

@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_images_that_are_not_uint8_rows_are_refused_not_cast(tmp_path, dtype):
    write_cifar(tmp_path, "cifar10", (np.zeros((10, 3, 32, 32), np.uint8), np.zeros(10, int)),
                (np.zeros((5, 3, 32, 32), np.uint8), np.zeros(5, int)))
    x = np.random.default_rng(0).random((5, 3072)).astype(dtype)
    blob = pickle.dumps({"data": x, "labels": [0] * 5}, protocol=2)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(blob)
    with pytest.raises(GradflowError, match=f"dtype {np.dtype(dtype).name}.*uint8 \\[N, 3072\\]"):
        load_cifar("cifar10", tmp_path, verify=False)


def test_constant_images_are_reported_as_a_data_problem(tmp_path):
    write_cifar(tmp_path, "cifar10", (np.full((10, 3, 32, 32), 7, np.uint8), np.arange(10) % 2),
                (np.full((5, 3, 32, 32), 7, np.uint8), np.zeros(5, int)))
    arrays = load_cifar("cifar10", tmp_path, verify=False)
    with pytest.raises(GradflowError, match="constant.*not image data"):
        DeviceCifar(arrays, torch.device("cpu"))


# --- 2 and 13. flags: one line, the flag's name, exit 2, nothing written -----------------------------

TRAIN_FLAGS = {
    "run name escapes": (["--run-name", "../escaped"], "--run-name"),
    "absolute run name": (["--run-name", "/tmp/gradflow-escaped"], "--run-name"),
    "empty out dir": (["--out-dir", ""], "--out-dir"),
    "empty device": (["--device", ""], "--device"),
    "device foo": (["--device", "foo"], "--device"),
    "device mps": (["--device", "mps"], "--device"),
    "device xla": (["--device", "xla"], "--device"),
    "device meta": (["--device", "meta"], "--device"),
    "momentum -1": (["--momentum", "-1"], "--momentum"),
    "weight decay -1": (["--weight-decay", "-1"], "--weight-decay"),
    "nesterov without momentum": (["--nesterov", "--momentum", "0"], "--momentum"),
    "seed 2**64": (["--seed", str(2 ** 64)], "--seed"),
    "scale abc": (["--model-opt", "scale=abc"], "scale='abc'"),
    "gate bias nan": (["--model-opt", "gate_bias=nan"], "gate_bias='nan'"),
    "gamma -1": (["--gamma", "-1"], "--gamma"),
    "negative subset": (["--train-subset", "-600"], "--train-subset"),
    "negative milestone": (["--milestones=-1"], "--milestones"),
    "negative halt": (["--halt-at", "-1"], "--halt-at"),
    "nan fail error": (["--fail-error", "nan"], "--fail-error"),
    "negative warm-up lr": (["--warmup-lr", "-1"], "--warmup-lr"),
    "empty data": (["--data", ""], "--data"),
    "missing data": (["--data", "/nonexistent/cifar"], "no such folder"),
}


@pytest.mark.parametrize("flags,named", TRAIN_FLAGS.values(), ids=TRAIN_FLAGS.keys())
def test_every_bad_train_flag_is_one_line_exit_2_and_leaves_nothing(data, tmp_path, capsys, flags, named,
                                                                    monkeypatch):
    from gradflow.cli.train import get_args_parser, main
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    base = ["--model", "resnet20", "--data", str(data), "--no-verify", "--smoke", "--out-dir", str(out),
            "--device", "cpu", "--no-progress", "--run-name", "run"]
    try:
        code = main(get_args_parser().parse_args(base + flags))
    except SystemExit as e:  # argparse's own refusal (one line, exit 2)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err and named in err, err
    assert not out.exists() or not any(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["out"])  # nothing beside it either
    assert not os.path.exists("/tmp/gradflow-escaped")


PROBE_FLAGS = {
    "gate bias 1e308": (["--gate-bias", "1e308"], "--gate-bias"),
    "gate bias nan": (["--gate-bias", "nan"], "--gate-bias"),
    "scale nan": (["--shortcut", "scale", "--scale", "nan"], "--scale"),
    "scale inf": (["--shortcut", "scale", "--scale", "inf"], "--scale"),
    "seed 2**64": (["--seed", str(2 ** 64)], "--seed"),
    "compare scale abc": (["--compare", "unit=original,scale=abc"], "scale='abc'"),
    "absurd batch": (["--batch-size", str(10 ** 9)], "--batch-size"),
    "absurd image size": (["--image-size", str(10 ** 6)], "--image-size"),
    "empty data": (["--data", ""], "--data"),
    "device meta": (["--device", "meta"], "--device"),
}


@pytest.mark.parametrize("flags,named", PROBE_FLAGS.values(), ids=PROBE_FLAGS.keys())
def test_every_bad_probe_flag_is_one_line_exit_2(tmp_path, capsys, flags, named):
    from gradflow.cli.probe import main
    assert main(["--model", "resnet20", "--out", str(tmp_path / "p"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err, err
    assert not (tmp_path / "p").exists()


def test_the_key_value_parser_is_shared_and_takes_lambda_and_dashes():
    from gradflow.probe import parse_option
    from gradflow.cli.train import get_args_parser
    assert gcli.parse_key_value("lambda=0.5") == ("scale", 0.5) == parse_option("lambda=0.5")
    assert gcli.parse_key_value("gate-bias=-6") == ("gate_bias", -6)
    args = get_args_parser().parse_args(["--model-opt", "lambda=0.5", "--model-opt", "scale-branch=True"])
    assert args.model_opt == [("scale", 0.5), ("scale_branch", True)]


# --- 3, 5, 11. resume keeps exactly what the checkpoint vouches for ----------------------------------

def test_rows_written_after_the_checkpoint_and_half_lines_are_dropped_on_resume(data, whole, tmp_path,
                                                                               capsys):
    pytest.importorskip("gradflow.tracing")
    part = train(tiny(data, tmp_path, halt_at=5, probe_every=2))  # checkpoint at 5: probes 0, 2, 4
    # what a process killed at iteration 7 leaves: rows after the checkpoint, then half a line each
    extra_log = [json.dumps(r) + "\n" for r in read_log(whole) if r["iteration"] > 5]
    with open(part / "log.jsonl", "a") as f:
        f.write("".join(extra_log) + '{"iteration": 8, "ep')
    probe = (part / "probe.csv").read_text().splitlines(keepends=True)
    at6 = ["6" + ln[1:] for ln in probe[1:] if ln.startswith("4,")]  # the probe of iteration 6
    with open(part / "probe.csv", "a") as f:
        f.write("".join(at6) + at6[0][:20])
    (part / ".checkpoint.pt.x1y2.tmp").write_bytes(b"")  # SIGKILL during a checkpoint write
    resumed = train(resume_config(part), resume=part)
    err = capsys.readouterr().err
    assert "dropped" in err and "half-written" in err and ".checkpoint.pt.x1y2.tmp" in err
    assert strip(read_log(resumed)) == strip(read_log(whole))  # probing does not change the numbers
    per_step = pd.read_csv(resumed / "probe.csv").groupby("iteration").size()
    assert list(per_step.index) == [0, 2, 4, 6] and per_step.nunique() == 1  # no probe step twice
    assert not list(resumed.glob(".*.tmp"))
    # the CSV log is rebuilt from the JSONL rows: the same iterations
    assert list(pd.read_csv(resumed / "log.csv")["iteration"]) == [r["iteration"] for r in read_log(whole)]


def test_damage_inside_the_vouched_rows_is_refused_with_a_message(data, tmp_path):
    run = train(tiny(data, tmp_path, halt_at=5))
    lines = (run / "log.jsonl").read_text().splitlines(keepends=True)
    (run / "log.jsonl").write_text(lines[0] + "{garbage\n" + "".join(lines[2:]))
    before = (run / "log.jsonl").read_bytes()
    with pytest.raises(GradflowError, match="line 2 is damaged.*vouches"):
        train(resume_config(run), resume=run)
    assert (run / "log.jsonl").read_bytes() == before  # refused: nothing rewritten


def test_truncate_never_removes_the_logs_before_the_replacement_is_on_disk(data, tmp_path, monkeypatch):
    run = train(tiny(data, tmp_path, stop=4))
    before = {n: (run / n).read_bytes() for n in ("log.jsonl", "log.csv")}

    def full_disk(path, write, fsync=False):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(runlog_mod, "atomic_write", full_disk)
    with pytest.raises(OSError):
        RunLog(run).truncate(2)
    assert {n: (run / n).read_bytes() for n in before} == before


def test_a_full_disk_mid_append_leaves_whole_lines_status_crashed_and_exit_3(data, whole, tmp_path,
                                                                              monkeypatch, capsys):
    real_append = RunLog.append

    def append(self, row):
        if row["iteration"] == 6:  # the JSONL line goes out, then the disk is full for the CSV
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row)[:30])
            raise OSError(errno.ENOSPC, "No space left on device", str(self.csv))
        return real_append(self, row)
    monkeypatch.setattr(RunLog, "append", append)
    from gradflow.cli.train import get_args_parser, main
    args = get_args_parser().parse_args(["--model", "resnet20", "--data", str(data), "--no-verify",
                                         "--device", "cpu", "--batch-size", "4", "--stop", "8",
                                         "--warmup-iters", "0", "--milestones", "", "--lr", "0.05",
                                         "--log-every", "2", "--eval-every", "4", "--checkpoint-every", "4",
                                         "--deterministic", "--out-dir", str(tmp_path / "b"),
                                         "--run-name", "run", "--no-progress"])
    assert main(args) == gcli.EXIT_CRASHED
    err = capsys.readouterr().err
    assert "ENOSPC" in err and "Traceback" not in err
    run = tmp_path / "b" / "run"
    st = status(run)
    assert st["status"] == "crashed" and "ENOSPC" in st["error"]
    monkeypatch.undo()
    resumed = train(resume_config(run), resume=run)
    assert strip(read_log(resumed)) == strip(read_log(whole))


def test_a_failed_append_is_cut_back_to_whole_lines(tmp_path, monkeypatch):
    log = RunLog(tmp_path)
    log.append({"iteration": 1})
    good = {p: p.read_bytes() for p in (log.jsonl, log.csv)}
    import csv as csv_mod
    real = csv_mod.DictWriter.writerow

    def half_then_full(self, row):
        self.writer.writerow(["2", "0.1"])  # part of the row reaches the file...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...then the disk is full
    monkeypatch.setattr(csv_mod.DictWriter, "writerow", half_then_full)
    with pytest.raises(OSError):
        log.append({"iteration": 2})
    monkeypatch.setattr(csv_mod.DictWriter, "writerow", real)
    assert {p: p.read_bytes() for p in good} == good and log.rows == 1


# --- 4. one process per run folder ----------------------------------------------------------------

def test_a_second_process_is_locked_out_and_told_who_holds_the_folder(data, tmp_path):
    run = train(tiny(data, tmp_path, halt_at=4))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from gradflow.runs.folder import RunLock; "
         "lk = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(run)],
        env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_holder(run)["pid"] == holder.pid
        before = (run / "log.jsonl").read_bytes()
        with pytest.raises(GradflowError, match=f"in use: process {holder.pid} on .*started"):
            train(resume_config(run), resume=run)
        assert (run / "log.jsonl").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(run) is None  # the lock went with the process
    train(resume_config(run), resume=run)
    assert status(run)["status"] == "ok"


# --- 6, 7. finished runs, runs killed before their first checkpoint ----------------------------------

def test_a_finished_run_resumed_is_a_no_op_and_a_larger_stop_extends_it(data, tmp_path, capsys):
    run = train(tiny(data, tmp_path, stop=4, lr=1e-6, fail_error=0.0))
    first = status(run)
    assert first["status"] == "fail" and first["test_error"] > 0
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"}
    out = run_training(resume_config(run), resume=run)
    assert out.already_finished and out.status == "fail" and out.exit_code == gcli.EXIT_FAILED
    assert "already finished" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"} == files
    out = run_training(resume_config(run, stop=6), resume=run)
    assert not out.already_finished and status(run)["iteration"] == 6
    assert [r["iteration"] for r in read_log(run)] == [2, 4, 6]


def test_a_run_killed_before_its_first_checkpoint_can_be_resumed_or_started_again(data, tmp_path):
    run = train(tiny(data, tmp_path, halt_at=3, checkpoint_every=100))
    # what SIGKILL before the first checkpoint leaves: config, a log row, status "running", no checkpoint
    (run / "checkpoint.pt").unlink()
    (run / "status.json").write_text(json.dumps({"status": "running", "iteration": 2}))
    for start in ("fresh", "resume"):
        if start == "fresh":
            out = run_training(tiny(data, tmp_path, stop=4, checkpoint_every=100))
        else:
            (run / "checkpoint.pt").unlink()
            (run / "status.json").write_text(json.dumps({"status": "running", "iteration": 2}))
            out = run_training(resume_config(run), resume=run)
        assert out.status == "ok" and [r["iteration"] for r in read_log(run)] == [2, 4]


# --- 9. the NaN guard sees buffers and the last update ----------------------------------------------

@pytest.mark.parametrize("what", ["buffer", "parameter"])
def test_nan_made_by_the_last_update_is_divergence_and_the_checkpoint_stays_good(data, tmp_path,
                                                                                 monkeypatch, what):
    real_step = torch.optim.SGD.step
    calls, current = {"n": 0}, {}

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 4:  # the final update: poison one BN running_var, or one weight
            model = current["model"]
            name, t = next((n, t) for n, t in (model.named_buffers() if what == "buffer"
                                               else model.named_parameters()) if n.endswith(
                "running_var" if what == "buffer" else "weight"))
            with torch.no_grad():
                t[(0,) * t.dim()] = float("inf")  # in place whatever the layout (channels_last on cpu)
        return out
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    real_init = steps_mod.Steps.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        current["model"] = self.eager
    monkeypatch.setattr(steps_mod.Steps, "__init__", init)
    with pytest.raises(TrainingDiverged, match=f"{what} .* NaN or Inf after iteration 4.*checkpoint"):
        train(tiny(data, tmp_path, stop=4, eval_every=2, checkpoint_every=2))
    model, info = gradflow.load_checkpoint(tmp_path / "run")
    assert info["step"] == 2
    assert all(torch.isfinite(t).all() for t in list(model.parameters()) + list(model.buffers())
               if t.is_floating_point())
    assert status(tmp_path / "run")["status"] == "diverged"


def test_an_exception_mid_run_marks_the_status_crashed(data, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("injected fault in evaluation")
    monkeypatch.setattr(steps_mod, "evaluate", broken)
    with pytest.raises(RuntimeError):
        train(tiny(data, tmp_path))
    st = status(tmp_path / "run")
    assert st["status"] == "crashed" and "injected fault" in st["error"]


# --- exit codes, wall time, file modes --------------------------------------------

def test_halt_at_exits_75_and_wall_time_continues_after_resume(data, tmp_path, capsys):
    from gradflow.cli.train import get_args_parser, main
    flags = ["--model", "resnet20", "--data", str(data), "--no-verify", "--device", "cpu",
             "--batch-size", "4", "--stop", "8", "--warmup-iters", "0", "--milestones", "",
             "--log-every", "2", "--eval-every", "4", "--checkpoint-every", "4",
             "--fail-error", "1", "--out-dir", str(tmp_path), "--run-name", "run", "--no-progress"]
    assert main(get_args_parser().parse_args(flags + ["--halt-at", "6"])) == gcli.EXIT_HALTED == 75
    run = tmp_path / "run"
    before = read_log(run)[-1]["wall_time"]
    saved = read_checkpoint(run)["wall_time"]
    assert saved >= before > 0
    assert main(get_args_parser().parse_args(["--resume", str(run), "--no-progress"])) == 0
    after = [r for r in read_log(run) if r["iteration"] > 6]
    assert after and min(r["wall_time"] for r in after) > saved


def test_run_files_get_the_users_umask(data, tmp_path):
    mask = 0o027  # not the common 0o022, and not what mkstemp's 0600 would give either
    old = os.umask(mask)
    try:
        run = train(tiny(data, tmp_path, stop=2, eval_every=2, checkpoint_every=2))
    finally:
        os.umask(old)
    for name in ("config.json", "status.json", "checkpoint.pt", "log.jsonl", "log.csv"):
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def _signal_run(data, tmp_path, sig, twice=False):
    cmd = [sys.executable, "-m", "gradflow", "train", *train_flags(data, tmp_path, "--probe-every", "1")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_rows(tmp_path / "run" / "log.jsonl", 3, proc)
    proc.send_signal(sig)
    if twice:
        time.sleep(0.05)
        proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr


def test_sigint_exits_130(data, tmp_path):
    code, err = _signal_run(data, tmp_path, signal.SIGINT)
    assert code == gcli.EXIT_SIGINT == 130, err[-2000:]
    st = status(tmp_path / "run")
    assert st["status"] == "interrupted" and st["reason"] == "SIGINT"


def test_two_sigterms_exit_143_and_resume_doubles_nothing(data, tmp_path):
    code, err = _signal_run(data, tmp_path, signal.SIGTERM, twice=True)
    assert code == gcli.EXIT_SIGTERM == 143, err[-2000:]
    assert "Traceback" not in err
    run = tmp_path / "run"
    assert status(run)["status"] == "interrupted"
    assert not list(run.glob(".*.tmp"))
    reached = max(r["iteration"] for r in read_log(run))
    ckpt = (run / "checkpoint.pt").exists()
    cmd = [sys.executable, "-m", "gradflow", "train", "--resume", str(run), "--stop", str(reached + 2),
           "--no-progress"]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    iters = [r["iteration"] for r in read_log(run)]
    assert iters == list(range(1, reached + 3))  # each iteration once, none missing
    probe_iters = sorted(set(pd.read_csv(run / "probe.csv")["iteration"]))
    rows_per_probe = pd.read_csv(run / "probe.csv").groupby("iteration").size()
    assert probe_iters == list(range(0, reached + 2)) and rows_per_probe.nunique() == 1
    assert ckpt or "starting it over" in out.stderr


@pytest.fixture
def small_filesystem(tmp_path):
    """A 3 MB tmpfs: room for one resnet20 checkpoint (2.2 MB) but not for the temporary of the next."""
    where = tmp_path / "small-fs"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small filesystem needs root and mount privileges here "
                    "(the ENOSPC path is also tested with an injected error above)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_real_full_disk_exits_3_names_enospc_and_keeps_the_last_checkpoint(data, small_filesystem, capsys):
    from gradflow.cli.train import get_args_parser, main
    args = get_args_parser().parse_args(
        ["--model", "resnet20", "--data", str(data), "--no-verify", "--device", "cpu", "--batch-size", "4",
         "--stop", "8", "--warmup-iters", "0", "--milestones", "", "--log-every", "2", "--eval-every", "4",
         "--checkpoint-every", "4", "--out-dir", str(small_filesystem), "--run-name", "run",
         "--no-progress"])
    assert main(args) == gcli.EXIT_CRASHED
    err = capsys.readouterr().err
    assert "ENOSPC" in err and "Traceback" not in err
    run = small_filesystem / "run"
    st = status(run)
    assert st["status"] == "crashed" and "ENOSPC" in st["error"]
    assert read_checkpoint(run)["step"] == 4  # the last good checkpoint, whole (its digest checks)
    assert [r["iteration"] for r in read_log(run)] in ([2, 4], [2, 4, 6], [2, 4, 6, 8])
    assert not list(run.glob(".*.tmp"))


def test_sigkill_between_a_probe_and_the_next_checkpoint_doubles_nothing(data, tmp_path):
    cmd = [sys.executable, "-m", "gradflow", "train",
           *train_flags(data, tmp_path, "--probe-every", "1", "--checkpoint-every", "3")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_rows(tmp_path / "run" / "log.jsonl", 5, proc)  # iterations 1..5: checkpoint at 3, rows after
    proc.kill()
    proc.wait()
    run = tmp_path / "run"
    assert status(run)["status"] == "running"  # SIGKILL cannot be recorded...
    from gradflow.runs.folder import holder
    assert holder(run) is None                 # ...but nobody holds the folder: it is dead
    reached = max(r["iteration"] for r in read_log(run))
    cmd = [sys.executable, "-m", "gradflow", "train", "--resume", str(run), "--stop", str(reached + 1),
           "--no-progress"]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    if reached % 3:  # log rows after the last checkpoint (at a multiple of 3) were cut
        assert "dropped" in out.stderr
    assert [r["iteration"] for r in read_log(run)] == list(range(1, reached + 2))
    per_step = pd.read_csv(run / "probe.csv").groupby("iteration").size()
    assert list(per_step.index) == list(range(0, reached + 1)) and per_step.nunique() == 1


def test_probe_rows_stay_under_their_columns_when_a_resumed_run_records_more(tmp_path):
    """A resumed run whose tracer has other columns (another order, or new ones) must not write
    values under another column's name: compared with pandas' own concat by column name."""
    log = RunLog(tmp_path)
    a = pd.DataFrame({"unit": [0, 1], "grad_ratio": [1.0, 2.0]})
    b = pd.DataFrame({"grad_ratio": [3.0, 4.0], "unit": [0, 1]})                     # another order
    c = pd.DataFrame({"unit": [0, 1], "x_norm": [5.0, 6.0], "grad_ratio": [7.0, 8.0]})  # one column more
    log.append_probe(a, 10)
    log.append_probe(b, 20)
    with pytest.warns(UserWarning, match="x_norm.*2 earlier row|x_norm.*4 earlier row"):
        log.append_probe(c, 30)
    d = pd.DataFrame({"unit": [0], "grad_ratio": [9.0]})                               # one column fewer
    log.append_probe(d, 40)
    got = pd.read_csv(tmp_path / "probe.csv")
    want = pd.concat([t.assign(iteration=i) for t, i in ((a, 10), (b, 20), (c, 30), (d, 40))], ignore_index=True)
    pd.testing.assert_frame_equal(got[list(want.columns)], want, check_dtype=False)
    assert log.probe_rows == len(want) == 7
