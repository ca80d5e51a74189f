"""The diverged-run flag on synthetic logs: a NaN loss, a loss spike that never recovers, one that
does, and a run that never learned (not a divergence)."""
import math

import pandas as pd

from gradflow.experiments.divergence import divergence


def _log(losses, start=25):
    return pd.DataFrame({"iteration": [start * (i + 1) for i in range(len(losses))], "train_loss": losses})


def test_nan_loss_is_diverged_at_its_iteration():
    d = divergence(_log([2.3, 2.0, 1.8, float("nan")]))
    assert d.diverged and d.kind == "nan" and d.iteration == 100
    d = divergence(_log([2.3, 2.0, math.inf, 1.5]))
    assert d.diverged and d.iteration == 75


def test_a_missing_loss_between_rows_is_not_a_nan():
    assert not divergence(_log([2.3, float("nan"), 1.8, 1.6])).diverged


def test_spike_after_warmup_then_chance_is_diverged():
    # learned to 1.7, jumped to 6.0 at iteration 100, stuck at ln 10 = 2.30 to the end (status "ok")
    d = divergence(_log([2.3, 2.0, 1.7, 6.0, 2.31, 2.30, 2.303]), status={"status": "ok"})
    assert d.diverged and d.kind == "spike" and d.iteration == 100
    assert "spike at iteration 100" in d.text and "never back" in d.text


def test_spike_that_recovers_is_a_note_not_a_divergence():
    d = divergence(_log([2.3, 2.0, 1.7, 4.0, 1.9, 1.5, 1.3]))
    assert not d.diverged and d.kind == "spike" and "recovered" in d.text


def test_a_run_that_never_learned_did_not_diverge():
    d = divergence(_log([2.31, 2.30, 2.32, 2.30, 2.31]))
    assert not d.diverged and d.kind is None
    # chance loss follows the classes: ln 100 = 4.6 for CIFAR-100
    assert not divergence(_log([4.6, 4.0, 3.5, 3.3]), classes=100).diverged
    assert divergence(_log([4.6, 4.0, 3.5, 9.0, 4.6]), classes=100).diverged


def test_an_exploded_loss_is_diverged_even_without_learning_first():
    # the laptop dropout-shortcut row: never below chance, then 1e6-1e10 without a NaN
    d = divergence(_log([2.31, 2.30, 5.0e3, 3.5e6, 3.9e10]))
    assert d.diverged and d.kind == "exploded" and d.iteration == 75 and "3.9e+10" in d.text
    assert not divergence(_log([2.31, 2.30, 200.0, 2.30])).diverged     # below 100 ln 10 = 230


def test_status_diverged_without_a_nan_in_the_log():
    d = divergence(_log([2.3, 2.0]), status={"status": "diverged", "message": "training diverged: x; kept"})
    assert d.diverged and d.kind == "status" and "training diverged: x" in d.text


def _folder(spec, losses, errors, status="ok"):
    import json
    spec.folder.mkdir(parents=True)
    from gradflow.experiments import make_scale
    cfg = {**make_scale("laptop").fields(), "seed": spec.seed, "model": spec.row.model,
           "model_options": {"width": 0.5}, "batch_size": 128, "dataset": "cifar10"}
    (spec.folder / "config.json").write_text(json.dumps({"config": cfg}))
    with open(spec.folder / "log.jsonl", "w") as f:
        for i, (l, e) in enumerate(zip(losses, errors)):
            f.write(json.dumps({"iteration": 50 * (i + 1), "train_loss": l, "test_error": e}) + "\n")
    (spec.folder / "status.json").write_text(json.dumps({"status": status}))


def test_results_table_and_figure_flag_diverged_runs(tmp_path):
    from gradflow.experiments import experiment_rows, make_scale, plan, results_table, select_rows
    from gradflow.experiments.claims import ordering_claim
    from gradflow.experiments.results import curve_runs, row_runs
    rows = select_rows(experiment_rows("table2"), ["resnet110-original", "resnet110-full_preact"])
    specs = plan(rows, 3, tmp_path / "table2-laptop")
    good = ([2.2, 1.8, 1.5, 1.3], [0.8, 0.7, 0.6])
    for s in specs:
        if s.key == "table2-resnet110-original-seed0":
            _folder(s, [2.2, 1.8, 6.0, 2.31, 2.30], [0.8, 0.7, 0.9, 0.9, 0.9])      # spike, then chance
        elif s.key == "table2-resnet110-original-seed1":
            _folder(s, [2.2, float("nan")], [0.8, None], status="diverged")        # NaN
        else:
            e = 0.55 if "original" in s.key else 0.50 + 0.01 * s.seed
            _folder(s, good[0], good[1] + [e])
    t = results_table(rows, specs, make_scale("laptop")).set_index("row")
    orig, pre = t.loc["table2-resnet110-original"], t.loc["table2-resnet110-full_preact"]
    assert orig["diverged"].startswith("2 of 3: seed 0: diverged: loss spike at iteration 150")
    assert "seed 1: diverged: the loss became NaN" in orig["diverged"]
    assert orig["median_error"] == 90.0 and orig["min_error"] == 55.0 and orig["seeds_finished"] == 3
    assert "0: 90.00 (diverged)" in orig["per_seed"] and pre["diverged"] == ""
    assert pre["median_error"] == 51.0
    labels = {k: r.label for k, r in curve_runs(rows, specs).items()}
    assert labels["resnet110-original"] == "resnet110-original (diverged)"
    claim = ordering_claim(list(row_runs(rows, specs).values()), replicates=200)
    assert claim.resampled.startswith("seeds only")
    # paper: full pre-activation (6.37) below original (6.61); here 51 vs 90: kept
    assert claim.kept == 1 and claim.pair_support[("table2-resnet110-full_preact", "table2-resnet110-original")] > 0.6


def test_per_image_results_match_a_plain_evaluation(tmp_path):
    import numpy as np
    import torch
    import gradflow
    from gradflow.data.cifar import write_cifar
    from gradflow.experiments.test_images import FILE, per_image_correct
    from gradflow.runs.checkpoint import save_checkpoint
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (80, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, 80)
    write_cifar(tmp_path / "data", "cifar10", (x[:60], y[:60]), (x[60:], y[60:]))
    torch.manual_seed(0)
    model = gradflow.create_model("resnet20", width=0.125).eval()
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "checkpoint.pt", dict(model="resnet20", options={"width": 0.125},
                                                model_state=model.state_dict(), step=8,
                                                config={"dataset": "cifar10", "stop": 8}))
    got = per_image_correct(run, str(tmp_path / "data"))
    # by hand: normalised with the training images' per-channel mean and std, as the trainer does
    train = x[:60].astype(np.float64) / 255
    mean, std = train.mean(axis=(0, 2, 3)), train.std(axis=(0, 2, 3), ddof=1)
    test = (x[60:].astype(np.float64) / 255 - mean[None, :, None, None]) / std[None, :, None, None]
    with torch.no_grad():
        want = (model(torch.tensor(test, dtype=torch.float32)).argmax(1).numpy() == y[60:])
    assert got.dtype == bool and len(got) == 20 and (got == want).all()
    assert (run / FILE).exists() and (per_image_correct(run, "unused: read from the cache") == got).all()
