"""The trainer: the paper's schedule, learning, resume, divergence, bad input, checkpoints."""
import json
import math

import pytest
import torch

import gradflow
from gradflow import GradflowError
from gradflow.data.cifar import synthetic_cifar
from gradflow.models import SHORTCUT_TYPES, UNIT_TYPES
from gradflow.cli.train import get_args_parser, main
from gradflow.training import (RECIPES, TrainingDiverged, get_preset, presets, resolve, resume_config,
                               save_checkpoint, schedule, train)
from gradflow.runs.log import COLUMNS, TIMING, read_log
from gradflow.training.config import TrainConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    synthetic_cifar(root, n_train=640, n_test=128)
    return root


def small(data, out, **kw):
    """A tiny CPU run: resnet20, batch 32 (20 iterations per epoch of the 640 images)."""
    base = dict(model="resnet20", data=str(data), verify_data=False, batch_size=32, stop=10,
                warmup_iters=0, lr=0.05, milestones=(), log_every=5, eval_every=10,
                checkpoint_every=10, out_dir=str(out), run_name="run", progress=False, device="cpu")
    return resolve(**{**base, **kw})


# --- the recipe ---------------------------------------------------------------------------

def test_paper_schedule_is_the_papers():
    cfg = resolve(recipe="paper")
    s = schedule(cfg, iters_per_epoch=50000 // 128)
    # 0.01 for the first 400 iterations, 0.1 until 32k, 0.01 until 48k, 0.001 until the stop at 64k
    want = {0: 0.01, 399: 0.01, 400: 0.1, 31999: 0.1, 32000: 0.01, 47999: 0.01, 48000: 0.001,
            63999: 0.001}
    for it, lr in want.items():
        assert s.lr_at(it) == pytest.approx(lr, rel=1e-12), it
    assert s.stop == 64000
    assert (cfg.batch_size, cfg.momentum, cfg.weight_decay, cfg.nesterov) == (128, 0.9, 1e-4, False)


def test_official_schedule_is_the_official_codes():
    cfg = resolve(recipe="official")
    ipe = 50000 // 64  # 781 iterations an epoch
    s = schedule(cfg, ipe)
    # the Lua code's epochs 81 and 122 (counted from 1) start after 80 and 121 epochs
    assert s.lr_at(0) == 0.1 and s.lr_at(80 * ipe - 1) == 0.1
    assert s.lr_at(80 * ipe) == pytest.approx(0.01) and s.lr_at(121 * ipe - 1) == pytest.approx(0.01)
    assert s.lr_at(121 * ipe) == pytest.approx(0.001)
    assert s.stop == 200 * 781 and cfg.batch_size == 64 and cfg.nesterov and cfg.momentum == 0.9


def test_every_knob_overrides_the_recipe_and_preset():
    cfg = resolve("table2-resnet164-original", recipe="official", lr=0.2, nesterov=False,
                  model_options={"shortcut": "scale"})
    assert (cfg.lr, cfg.nesterov, cfg.batch_size, cfg.model) == (0.2, False, 64, "resnet164")
    assert cfg.model_options == {"unit": "original", "shortcut": "scale"}


def test_presets_cover_the_cifar_rows_of_tables_1_2_3():
    rows = presets()
    by_table = {t: [p for p in rows.values() if p.table == t] for t in "123"}
    # Table 1: original, 3 constant scalings, 8 exclusive gate biases (0..-7), 2 shortcut-only
    # gates, 1x1 conv, dropout. Table 2: 5 units x 2 depths. Table 3: 6 nets x 2 units.
    assert (len(by_table["1"]), len(by_table["2"]), len(by_table["3"])) == (16, 10, 12)
    for p in rows.values():
        assert set(p.options) <= set(gradflow.model_options(p.model))
        assert p.options.get("unit", "full_preact") in UNIT_TYPES
        assert p.options.get("shortcut", "identity") in SHORTCUT_TYPES
    assert rows["table1-shortcut-gate-b-6"].paper_error == "6.91"
    assert rows["table3-cifar100-resnet1001-preact"].dataset == "cifar100"
    assert resolve("table3-cifar100-resnet1001-preact").stop == RECIPES["paper"]["stop"]
    with pytest.raises(GradflowError, match="1-layer"):
        get_preset("table3-cifar10-resnet110-1layer-preact")


# --- training -----------------------------------------------------------------------------

def test_learns_a_synthetic_task(data, tmp_path):
    run = train(small(data, tmp_path, stop=20, eval_every=20))
    rows = read_log(run)
    assert [r["iteration"] for r in rows] == [5, 10, 15, 20]
    assert rows[-1]["test_error"] < 0.1 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "ok"
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["lr"] == 0.05 and "gradflow" in saved["code"]
    header = (run / "log.csv").read_text().splitlines()[0].split(",")
    assert header == list(COLUMNS)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_the_hardware_and_says_so(data, tmp_path, capsys, monkeypatch, native):
    # --amp auto: bf16 autocast where the CPU does bf16 in hardware, float32 elsewhere; the probes
    # are replaced so that both branches run here, and the dtype is observed at the convolutions
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native, raising=False)
    seen = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.add(o.dtype) if isinstance(m, torch.nn.Conv2d) else None)
    try:
        run = train(small(data, tmp_path, stop=2, log_every=1, eval_every=2, checkpoint_every=2))
    finally:
        hook.remove()
    want = "bf16 autocast" if native else "float32"
    assert seen == ({torch.bfloat16} if native else {torch.float32})
    assert json.loads((run / "config.json").read_text())["precision"] == want
    assert f"precision: {want} (--amp auto: cpu with" in capsys.readouterr().err
    from gradflow.runs.read import read_run
    assert read_run(run).device == f"cpu ({want})"


def test_a_resumed_run_keeps_the_precision_it_began_with(data, tmp_path, capsys, monkeypatch):
    # begun where --amp auto meant float32, resumed where it means bf16: it goes on in float32
    native = [False]
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native[0], raising=False)
    part = train(small(data, tmp_path, stop=4, log_every=1, eval_every=2, checkpoint_every=2, halt_at=2))
    native[0] = True
    seen = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.add(o.dtype) if isinstance(m, torch.nn.Conv2d) else None)
    try:
        train(resume_config(part), resume=part)
    finally:
        hook.remove()
    assert seen == {torch.float32}
    assert "precision: float32 (--amp auto: kept from the run's start" in capsys.readouterr().err
    assert json.loads((part / "config.json").read_text())["precision"] == "float32"


def test_high_error_is_marked_fail(data, tmp_path):
    run = train(small(data, tmp_path, stop=5, eval_every=5, lr=1e-5))
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "fail" and status["test_error"] > 0.2


def test_resume_reproduces_the_uninterrupted_run(data, tmp_path):
    # dropout on the shortcut makes the result depend on the saved RNG state too; halt mid-interval
    kw = dict(stop=24, log_every=4, eval_every=8, checkpoint_every=8, deterministic=True,
              model_options={"shortcut": "dropout"}, milestones=(14,))
    whole = train(small(data, tmp_path / "a", **kw))
    part = train(small(data, tmp_path / "b", halt_at=11, **kw))
    assert json.loads((part / "status.json").read_text())["status"] == "interrupted"
    assert read_log(part)[-1]["iteration"] == 8
    resumed = train(resume_config(part), resume=part)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(read_log(resumed)) == strip(read_log(whole))
    a, _ = gradflow.load_checkpoint(whole)
    b, _ = gradflow.load_checkpoint(resumed)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_divergence_stops_with_a_clear_message_and_keeps_the_checkpoint(data, tmp_path, capsys):
    # lr jumps to 1e28 after iteration 5: the loss becomes NaN/Inf within a few steps
    cfg = small(data, tmp_path, stop=20, milestones=(6,), gamma=1e30, checkpoint_every=5)
    with pytest.raises(TrainingDiverged, match="NaN or Inf.*last good checkpoint"):
        train(cfg)
    run = tmp_path / "run"
    model, info = gradflow.load_checkpoint(run)
    assert info["step"] == 5 and all(torch.isfinite(p).all() for p in model.parameters())
    assert json.loads((run / "status.json").read_text())["status"] == "diverged"


def test_divergence_from_the_cli_exits_1(data, tmp_path, capsys):
    args = get_args_parser().parse_args(
        ["--model", "resnet20", "--data", str(data), "--no-verify", "--smoke", "--train-subset", "320",
         "--lr", "1e30", "--warmup-iters", "0", "--out-dir", str(tmp_path), "--no-progress",
         "--device", "cpu"])
    assert main(args) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "precision: " not in ln]  # --amp auto
    assert len(lines) == 1 and "diverged" in lines[0]


# --- bad input: one line, exit code 2, nothing written ----------------------------------------

@pytest.mark.parametrize("flags,named", [
    (["--model", "resnet21"], "'resnet21'"),
    (["--preset", "table9-x"], "'table9-x'"),
    (["--unit", "preact"], "'preact'"),
    (["--model-opt", "colour=red"], "'colour'"),
    (["--data", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--batch-size", "5000"], "batch_size=5000"),
    (["--out-dir", "/dev/null/runs"], "/dev/null/runs"),
])
def test_bad_input_is_one_line_and_exit_2(data, tmp_path, capsys, flags, named):
    base = ["--model", "resnet20", "--data", str(data), "--no-verify", "--smoke",
            "--out-dir", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]
    assert main(get_args_parser().parse_args(base + flags)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gradflow train: error:") and named in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_smoke_without_data_runs_on_generated_data_and_says_so(tmp_path, capsys):
    args = get_args_parser().parse_args(
        ["--model", "resnet20", "--smoke", "--stop", "2", "--batch-size", "4", "--log-every", "1",
         "--eval-every", "2", "--checkpoint-every", "2", "--test-subset", "8", "--fail-error", "1",
         "--out-dir", str(tmp_path),
         "--run-name", "run", "--no-progress", "--device", "cpu"])
    assert main(args) == 0
    assert "training on generated data, not CIFAR" in capsys.readouterr().err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert saved["synthetic"] is True and [r["iteration"] for r in read_log(tmp_path / "run")] == [1, 2]


def test_a_taken_run_name_is_refused(data, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")      # not a file the trainer writes
    with pytest.raises(GradflowError, match="already exists.*--resume"):
        train(small(data, tmp_path))
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_an_empty_run_folder_is_used_and_said(data, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    run = train(small(data, tmp_path, stop=2))
    assert (run / "checkpoint.pt").exists()
    assert "exists and holds no run file" in capsys.readouterr().err


def test_resume_refuses_to_change_the_recipe(data, tmp_path):
    run = train(small(data, tmp_path, stop=10, halt_at=5))
    with pytest.raises(GradflowError, match="cannot change lr"):
        resume_config(run, lr=0.3)


# --- checkpoints ---------------------------------------------------------------------------

def test_checkpoint_rebuilds_the_model_with_one_call(data, tmp_path):
    run = train(small(data, tmp_path, stop=10, model_options={"unit": "original"}))
    model, info = gradflow.load_checkpoint(run / "checkpoint.pt")
    assert info["model"] == "resnet20"
    assert info["options"] == {"unit": "original", "num_classes": 10}
    assert info["step"] == 10 and not model.training
    raw = torch.load(run / "checkpoint.pt", weights_only=True)  # tensors and plain data only
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw["model_state"][k])
    assert {"optimizer", "rng", "config", "epoch", "log_acc"} <= set(raw)


def test_a_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})

    def broken(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_lr_schedule_is_what_the_log_shows(data, tmp_path):
    run = train(small(data, tmp_path, stop=12, warmup_iters=3, warmup_lr=0.01, milestones=(6, 9),
                      log_every=3, eval_every=12, checkpoint_every=12))
    # the lr of the last iteration in each row: iterations 2, 5, 8, 11 (from 0)
    assert [r["lr"] for r in read_log(run)] == pytest.approx([0.01, 0.05, 0.005, 0.0005])
    assert not any(math.isnan(r["train_loss"]) for r in read_log(run))


def test_a_linear_warmup_ramps_from_the_warmup_lr_to_the_lr(data, tmp_path):
    """lr_at(i) = 0.01 + (0.1 - 0.01) i / 4 for i < 4, then the step schedule; the log shows it."""
    run = train(small(data, tmp_path, stop=8, lr=0.1, warmup_iters=4, warmup_lr=0.01, warmup_shape="linear",
                      milestones=(6,), log_every=1, eval_every=8, checkpoint_every=8))
    want = [0.01 + 0.09 * i / 4 for i in range(4)] + [0.1, 0.1, 0.01, 0.01]
    assert [r["lr"] for r in read_log(run)] == pytest.approx(want, rel=1e-12)
    with pytest.raises(GradflowError, match="warmup_shape='cosine'.*--warmup-shape.*'constant'"):
        TrainConfig(warmup_shape="cosine")


def test_probe_every_appends_per_unit_records(data, tmp_path):
    pytest.importorskip("gradflow.tracing")
    import pandas as pd
    run = train(small(data, tmp_path, stop=10, probe_every=4))
    table = pd.read_csv(run / "probe.csv")
    assert sorted(set(table["iteration"])) == [0, 4, 8]
    names = [f"stages.{s}.{i}" for s in range(3) for i in range(3)]  # resnet20: 3 stages of 3 units
    for _, rows in table.groupby("iteration"):
        assert names == [n for n in rows["name"] if n.startswith("stages.")]


def test_evaluation_in_any_batch_size_is_the_whole_test_set(data):
    """evaluate() in small batches equals cross-entropy and error over the whole test set at once."""
    import torch.nn.functional as F
    from contextlib import nullcontext
    from gradflow.data.cifar import DeviceCifar, load_cifar, normalise
    from gradflow.training.distributed import Dist
    from gradflow.training.steps import evaluate
    torch.manual_seed(0)
    dev = torch.device("cpu")
    cifar = DeviceCifar(load_cifar("cifar10", data, verify=False), dev)
    model = gradflow.create_model("resnet20").train()
    with torch.no_grad():
        for _ in range(2):   # running statistics that are not the initial ones
            model(normalise(cifar.train_x[:64], cifar.mean, cifar.std))
    model.eval()
    with torch.no_grad():
        logits = model(normalise(cifar.test_x, cifar.mean, cifar.std))
    want_loss = F.cross_entropy(logits, cifar.test_y).item()
    want_err = (logits.argmax(1) != cifar.test_y).float().mean().item()
    model.train()
    for bs in (7, 128, 1000):
        loss, err = evaluate(model, cifar, Dist(0, 1, dev), nullcontext, False, bs)
        assert loss == pytest.approx(want_loss, rel=1e-5) and err == pytest.approx(want_err, abs=1e-12)
        assert model.training          # left as found
