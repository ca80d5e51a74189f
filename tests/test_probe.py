"""The probe CLI end to end, in subprocesses: exit codes, files, and numbers checked independently."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import gradflow
from gradflow.probe import ProbeConfig, build_model, parse_compare, run_probe, synthetic

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MPLBACKEND="Agg")


def probe(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradflow.probe", "--no-progress", *args],
                          capture_output=True, text=True, env=ENV, cwd=cwd or ROOT, timeout=300)


def autograd_ratios(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor,
                    median: bool = False) -> np.ndarray:
    """Batch mean of ||dE/dx_l|| / ||dE/dx_L|| per unit (``median``: the ratio of batch medians of
    ||dE/dx_l||), by plain autograd (no gradflow tracing)."""
    units = model.units()
    xs = []
    hooks = [u.register_forward_pre_hook(lambda m, a: xs.append(a[0])) for u in units]
    hooks.append(units[-1].register_forward_hook(lambda m, a, out: xs.append(out)))
    model.train()
    logits = model(x)
    for h in hooks:
        h.remove()
    loss = F.cross_entropy(logits, labels % logits.shape[1])
    grads = torch.autograd.grad(loss, xs)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).double()  # [units + 1, B]
    if median:
        med = norms.numpy()
        return np.median(med, axis=1) / np.median(med[-1])
    return (norms / norms[-1]).mean(dim=1).numpy()


def test_cli_default_report_files_and_numbers(tmp_path):
    r = probe("--model", "resnet20", "--batch-size", "8", "--seed", "3", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "synthetic" in r.stdout and "eq. (5)" in r.stdout and "stage" in r.stdout
    files = {p.name for p in tmp_path.iterdir()}
    assert {"units.csv", "summary.json", "config.json", "figure.png"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    units = pd.read_csv(tmp_path / "units.csv")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["versions"] == {"gradflow": gradflow.__version__, "torch": torch.__version__}
    assert config["batch_size"] == 8 and config["options"] == {} and "synthetic" in config["inputs"]
    # independent: the same seed, model and batch, plain autograd
    built = build_model("resnet20", {}, seed=3)
    (x, y), = synthetic(8, 1, 32, seed=3)
    want = autograd_ratios(built.module, x, y)
    got = units.sort_values("unit")["grad_ratio"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # identity shortcuts, pre-activation: the direct term equals eq. (5) wherever it covers a unit (all
    # but the two projection units, where no prediction is made)
    body = units[~units["is_top"]]
    covered = body["pred_basis"] == "eq. (5)"
    np.testing.assert_allclose(body.loc[covered, "direct_vs_pred"], 1.0, atol=1e-5)
    assert body.loc[~covered, "unit"].tolist() == [3, 6] and body.loc[~covered, "pred_direct_ratio"].isna().all()
    # the summary agrees with the library's own summary of the same table
    report = json.loads((tmp_path / "summary.json").read_text())
    v = report["variants"][0]
    lib = gradflow.theory.summarize(units.drop(columns=["config"]))
    assert v["summary"]["total_rate"]["slope"] == pytest.approx(lib["total_rate"]["slope"], rel=1e-6)
    stage0 = v["stages"][0]
    assert stage0["first"]["grad_ratio"] == pytest.approx(want[0], rel=1e-4)
    assert "total" in v["verdicts"] and "direct" in v["verdicts"]


def test_cli_json_and_scaled_shortcut(tmp_path):
    r = probe("--model", "resnet20", "--shortcut", "scale", "--lambda", "0.5", "--batch-size", "4",
              "--batches", "2", "--json", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep == json.loads((tmp_path / "summary.json").read_text())
    v = rep["variants"][0]
    assert v["options"] == {"shortcut": "scale", "scale": 0.5}
    assert v["summary"]["predicted_direct_rate"] == pytest.approx(np.log(0.5))
    assert v["verdicts"]["direct"].startswith("eq. (8) at 7 of 9 units (exact by construction")
    units = pd.read_csv(tmp_path / "units.csv")
    assert units["step"].nunique() == 2
    body = units[~units["is_top"]]
    covered = body["pred_basis"] == "eq. (8)"
    assert covered.sum() == 2 * 7      # the projections are not covered, in both batches
    np.testing.assert_allclose(body.loc[covered, "direct_vs_pred"], 1.0, atol=1e-4)


def test_cli_compare_two_variants(tmp_path):
    r = probe("--model", "resnet20", "--batch-size", "4", "--compare", "unit=original",
              "unit=full_preact", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    units = pd.read_csv(tmp_path / "units.csv")
    assert sorted(units["config"].unique()) == ["unit=full_preact", "unit=original"]
    kinds = units.groupby("config")["kind"].first()
    assert kinds["unit=original"].startswith("gradflow.original")
    assert (tmp_path / "figure.png").stat().st_size > 10_000
    assert "unit=original" in r.stdout and "unit=full_preact" in r.stdout


def test_compare_sets_cover_tables():
    t1, t2 = parse_compare(["table1"]), parse_compare(["table2"])
    assert {o["shortcut"] for o in t1.values()} == set(gradflow.models.SHORTCUT_TYPES)
    assert {o["unit"] for o in t2.values()} == set(gradflow.models.UNIT_TYPES)
    assert any(o.get("scale_branch") for o in t1.values())
    mixed = parse_compare(["table2", "unit=original,shortcut=scale,lambda=0.5"])
    assert mixed["unit=original,shortcut=scale,lambda=0.5"] == {"unit": "original", "shortcut": "scale",
                                                                "scale": 0.5}


def test_table1_in_process_every_variant_predicted_or_said_so():
    cfg = ProbeConfig(model="resnet20", batch_size=4, compare=parse_compare(["table1"]), progress=False)
    res = run_probe(cfg)
    assert len(res.variants) == 10
    from gradflow.probe.report import verdicts
    for label, v in res.variants.items():
        text = verdicts(v.summary, v.units)["direct"]
        assert "departs" not in text, (label, text)


def test_cli_data_and_checkpoint(tmp_path):
    from gradflow.data.cifar import synthetic_cifar
    from gradflow.runs.checkpoint import save_checkpoint
    synthetic_cifar(tmp_path / "cifar", n_train=10, n_test=40)
    torch.manual_seed(1)
    model = gradflow.create_model("resnet20", unit="original")
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, {"model": "resnet20", "options": {"unit": "original"},
                           "model_state": model.state_dict()})
    r = probe("--checkpoint", str(ckpt), "--data", str(tmp_path / "cifar"), "--batch-size", "8",
              "--mode", "eval", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "CIFAR-10 test images" in r.stdout
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "CIFAR-10" in config["inputs"] and config["mode"] == "eval"
    units = pd.read_csv(tmp_path / "out" / "units.csv")
    assert units.loc[~units["is_top"], "kind"].str.startswith("gradflow.original").all()


def test_third_party_models_in_process():
    assert build_model("timm:resnetv2_50x1_bit", {}, 0).image_size == 224
    assert build_model("torchvision:resnet18", {}, 0).image_size == 224
    for name in ("torchvision:resnet18", "timm:resnetv2_50x1_bit"):
        res = run_probe(ProbeConfig(model=name, batch_size=2, image_size=32, progress=False))
        v = next(iter(res.variants.values()))
        assert res.config["image_size"] == 32 and v.source == name.split(":")[0]
        body = v.units[~v.units["is_top"]]
        assert len(body) in (8, 16) and body["grad_ratio"].notna().all()


# Bad input, each in its own process: one line naming the problem, exit 2.
BAD = {
    "unknown model": (["--model", "resnet1000"], "resnet1001"),
    "option the model does not take": (["--model", "torchvision:resnet18", "--unit", "original"], "--unit"),
    "missing checkpoint": (["--checkpoint", "{tmp}/nothing.pt"], "no checkpoint"),
    "corrupt checkpoint": (["--checkpoint", "{tmp}/corrupt.pt"], "cannot read checkpoint"),
    "data folder not CIFAR": (["--model", "resnet20", "--data", "{tmp}/empty"], "not a CIFAR python folder"),
    "device not there": (["--model", "resnet20", "--device", "cuda:7"], "cuda:7"),
    "unwritable output": (["--model", "resnet20", "--out", "{tmp}/afile/sub"], "cannot write"),
}
# More bad input, through the same main() in this process (each subprocess costs an import of torch).
BAD_IN_PROCESS = {
    "unknown torchvision model": (["--model", "torchvision:resnet5O"], "resnet50"),
    "bad unit value": (["--model", "resnet20", "--unit", "preact"], "unit='preact'"),
    "corrupt CIFAR file": (["--model", "resnet20", "--data", "{tmp}/badcifar"], "corrupt"),
    "device not a device": (["--model", "resnet20", "--device", "gpu0"], "gpu0"),
    "unknown compare set": (["--model", "resnet20", "--compare", "table9"], "table1"),
    "batches zero": (["--model", "resnet20", "--batches", "0"], "batches"),
    "unknown flag": (["--model", "resnet20", "--frobnicate"], "frobnicate"),
    "checkpoint with options": (["--checkpoint", "x.pt", "--unit", "original"], "--checkpoint"),
}


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "empty").mkdir()
    (tmp_path / "badcifar").mkdir()
    (tmp_path / "badcifar" / "test_batch").write_bytes(b"garbage")
    (tmp_path / "afile").write_text("a file, not a folder")
    return tmp_path


def _args(args, tmp):
    args = [a.replace("{tmp}", str(tmp)) for a in args]
    return args + ([] if "--out" in args else ["--out", str(tmp / "o")])


def _check(case, want, code, out, err):
    lines = err.strip().splitlines()
    assert code == 2, (case, err)
    assert "Traceback" not in err and len(lines) == 1, (case, err)
    assert lines[0].startswith("gradflow probe: error:") and want in lines[0], (case, lines)
    assert out == "", (case, out)


def test_bad_input_subprocess_one_line_exit_2(bad_files):
    cases = list(BAD.items())
    for i in range(0, len(cases), 2):  # two at a time: most of each run is importing torch
        procs = {case: subprocess.Popen([sys.executable, "-m", "gradflow.probe", "--no-progress",
                                         *_args(args, bad_files)], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
                 for case, (args, _) in cases[i:i + 2]}
        for case, p in procs.items():
            out, err = p.communicate(timeout=300)
            _check(case, BAD[case][1], p.returncode, out, err)


@pytest.mark.parametrize("case", list(BAD_IN_PROCESS))
def test_bad_input_in_process(case, bad_files, capsys):
    from gradflow.cli.probe import main
    args, want = BAD_IN_PROCESS[case]
    code = main(["--no-progress", *_args(args, bad_files)])
    cap = capsys.readouterr()
    _check(case, want, code, cap.out, cap.err)


# --- the report's words: the finding first, no verdict that holds by construction -------

def _report(cfg: ProbeConfig):
    from gradflow.probe import format_report, report_dict
    res = run_probe(cfg)
    rep = report_dict(res)
    return res, rep, format_report(rep)


NEVER = ("cannot vanish", "no gradient recorded", "as predicted;", "the direct term is as predicted")


def test_report_identity_leads_with_the_finding_checked_by_autograd():
    res, rep, text = _report(ProbeConfig(model="resnet20", batch_size=4, seed=2, progress=False))
    lines = text.splitlines()
    assert lines[0].startswith("resnet20") and lines[1].startswith("finding: ")
    assert text.count("by construction") == 1 and lines[2].startswith("by construction: ")  # said once
    assert "eq. (5)/(8) for the direct term" not in text and "\n  direct " not in text     # not again below
    assert not any(n in text for n in NEVER), text
    v = rep["variants"][0]
    assert v["equation"] == "eq. (5) at 7 of 9 units"
    assert v["verdicts"]["direct"].startswith("eq. (5) at 7 of 9 units (exact by construction")
    assert "direct_rate" not in v["verdicts"]   # 0 = 0 by construction for identity shortcuts: not spent
    # independent: plain autograd on the same network and batch
    built = build_model("resnet20", {}, seed=2)
    (x, y), = synthetic(4, 1, 32, seed=2)
    want = autograd_ratios(built.module, x, y)
    med = autograd_ratios(built.module, x, y, median=True)
    assert v["finding"]["total_mean"] == pytest.approx(want[0], rel=1e-4)
    assert v["finding"]["total_change"] == pytest.approx(med[0], rel=1e-4)   # the ratio of batch medians
    units = built.module.units()
    for s in v["stages"]:
        a, b = s["own_units"]
        # a stage's growth starts at its first unit that reads the stage's own shape (not the projection)
        assert units[a].in_channels == units[a].out_channels and units[a].stride == 1
        assert s["growth"] == pytest.approx(med[a] / med[b], rel=1e-4)
    # the share is ||direct|| / ||dE/dx_l|| per sample, batch mean
    unit = res.variants[next(iter(res.variants))].units
    assert unit.loc[~unit["is_top"], "direct_share"].between(0, 1.0 + 1e-6).all()


def test_report_post_activation_and_lambda_and_gate_verdicts_are_claims():
    cfg = ProbeConfig(model="resnet20", batch_size=4, progress=False,
                      compare={"original": dict(unit="original"),
                               "scale": dict(unit="original", shortcut="scale", scale=0.5),
                               "gate": dict(unit="original", shortcut="exclusive_gate", gate_bias=0.0)})
    res, rep, text = _report(cfg)
    assert not any(n in text for n in NEVER), text
    v = {r["label"]: r for r in rep["variants"]}
    # ReLU after the addition: eq. (5)/(8) cover no unit, and the report says why instead of "as predicted"
    for label in ("original", "scale", "gate"):
        assert v[label]["verdicts"]["direct"].startswith("eq. (5)/(8) cover no unit"), v[label]["verdicts"]
        assert not v[label]["equation"].startswith("eq."), v[label]["equation"]
        assert v[label]["by_construction"] is None
    assert "f = identity" in v["original"]["equation"] and "f = identity" in v["scale"]["equation"]
    # no eq. (8) rate for lambda = 0.5 on original units: the ReLU after the addition is not a lambda
    assert v["scale"]["summary"]["predicted_direct_rate"] is None      # NaN, in JSON
    # the compare table leads, with each network's share at the first unit
    assert text.splitlines()[0].startswith("finding, per network")


def test_report_without_a_split_says_so_and_nothing_about_cancelling():
    from gradflow.probe import trace_once
    from gradflow.probe.report import variant_report
    from gradflow.probe.text import format_report
    from gradflow.probe.run import VariantResult
    built = build_model("resnet20", {}, seed=0)
    traced = trace_once(built.module, synthetic(4, 1, 32, seed=0), seed=0, split=False)
    units = traced.units
    body = units[~units["is_top"]]
    assert "direct_ratio" not in body or body["direct_ratio"].isna().all()
    v = variant_report(VariantResult("no split", "resnet20", {}, "zoo", units, traced.tracer.summary(), {}))
    assert "no direct/residual split" in v["finding"]["text"]
    assert "cancel" not in v["verdicts"] and v["by_construction"] is None
    assert all("no direct/residual split here" in s["verdict"] for s in v["stages"])
    text = format_report({"inputs": "x", "config": dict(mode="train", device="cpu", seed=0, batch_size=4,
                                                         batches=1, image_size=32), "variants": [v]})
    assert not any(n in text for n in NEVER), text


class _Residual(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.f = torch.nn.Sequential(torch.nn.LayerNorm(w), torch.nn.Linear(w, w), torch.nn.GELU())

    def forward(self, x):
        return x + self.f(x)


class _MLP(torch.nn.Module):
    """A hand-written residual MLP, found through torch.fx (no declaration)."""

    def __init__(self, w=16, depth=4):
        super().__init__()
        self.inp = torch.nn.Linear(3 * 8 * 8, w)
        self.blocks = torch.nn.Sequential(*[_Residual(w) for _ in range(depth)])
        self.head = torch.nn.Linear(w, 10)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x.flatten(1))))


def test_report_fx_found_units_speak_only_of_what_was_recorded():
    from gradflow.probe import trace_once
    from gradflow.probe.report import variant_report
    from gradflow.probe.text import format_report
    from gradflow.probe.run import VariantResult
    torch.manual_seed(0)
    traced = trace_once(_MLP(), synthetic(4, 1, 8, seed=0), seed=0)
    units = traced.units
    v = variant_report(VariantResult("mlp", "mlp", {}, "fx", units, traced.tracer.summary(), {}))
    text = format_report({"inputs": "x", "config": dict(mode="train", device="cpu", seed=0, batch_size=4,
                                                         batches=1, image_size=8), "variants": [v]})
    assert not any(n in text for n in NEVER), text
    body = units[~units["is_top"]]
    assert len(body) == 4 and body["grad_ratio"].notna().all()
    split = "direct_ratio" in body and body["direct_ratio"].notna().any()
    assert ("no direct/residual split" in v["finding"]["text"]) != bool(split)
    assert ("cancel" in v["verdicts"]) == bool(split)


def test_report_third_party_resnets_are_not_labelled_eq5():
    for name in ("torchvision:resnet18", "timm:resnet18"):
        res, rep, text = _report(ProbeConfig(model=name, batch_size=2, image_size=32, progress=False))
        v = rep["variants"][0]
        # ReLU after the addition: eq. (5) does not apply, whatever the identity shortcuts suggest
        assert not v["equation"].startswith("eq. (5)"), (name, v["equation"])
        assert "prediction for the direct term: eq. (5)" not in text
        assert v["verdicts"]["direct"].startswith("eq. (5)/(8) cover no unit"), (name, v["verdicts"])
        assert "f = identity" in v["equation"]
        # no eq. (5)/(8) points on its figure
        assert res.variants[next(iter(res.variants))].units["pred_direct_ratio"].isna().sum() >= 8
        assert not any(n in text for n in NEVER), text
        # stages after the first hold one unit of their own shape: said, with its numbers
        one = [s for s in v["stages"] if s["growth"] is None]
        assert one and all("one unit reads this shape" in s["verdict"] for s in one)


# --- the probe leaves the caller's model as it found it; releases variants; records what it probed ---

def test_probe_model_restores_the_callers_model():
    from gradflow.probe.run import probe_model
    built = build_model("resnet20", dict(shortcut="dropout"), seed=0)
    model = built.module
    model.eval()
    model.stages[1].train()                        # a mixed-mode model, as users make them
    model.fc.weight.requires_grad_(False)          # a partly frozen one
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    devices = {p.device for p in model.parameters()}
    rng = torch.get_rng_state()
    probe_model(built, synthetic(4, 1, 32, seed=0), ProbeConfig(model="resnet20", mode="train"),
                torch.device("cpu"), "x")
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    for n, b in model.named_buffers():   # train-mode BN would have moved its running statistics
        assert torch.equal(b, buffers[n]), n
    assert {p.device for p in model.parameters()} == devices
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_compare_releases_each_variant_before_building_the_next(monkeypatch):
    import gc
    import weakref
    import gradflow.probe.run as run
    refs, alive_at_build = [], []
    real = run.build_model

    def tracked(*args, **kwargs):
        gc.collect()
        alive_at_build.append(sum(r() is not None for r in refs))
        built = real(*args, **kwargs)
        refs.append(weakref.ref(built.module))
        return built

    monkeypatch.setattr(run, "build_model", tracked)
    res = run_probe(ProbeConfig(model="resnet20", batch_size=2, progress=False,
                                compare={"a": dict(unit="original"), "b": dict(unit="full_preact"),
                                         "c": dict(shortcut="scale")}))
    assert len(res.variants) == 3 and alive_at_build == [0, 0, 0]
    gc.collect()
    assert all(r() is None for r in refs)


def test_checkpoint_probe_records_the_probed_model_and_real_timings(tmp_path):
    from gradflow.probe import report_dict, write_outputs
    from gradflow.runs.checkpoint import save_checkpoint
    model = gradflow.create_model("resnet32", unit="original")
    save_checkpoint(tmp_path / "c.pt", {"model": "resnet32", "options": {"unit": "original"},
                                        "model_state": model.state_dict()})
    res = run_probe(ProbeConfig(checkpoint=str(tmp_path / "c.pt"), batch_size=2, progress=False))
    assert res.config["model"] == "resnet32" and res.config["options"] == {"unit": "original"}
    write_outputs(res, report_dict(res), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"] == "resnet32"   # not the CLI's default resnet1001
    timings = json.loads((tmp_path / "summary.json").read_text())["variants"][0]["timings"]
    assert timings["build"] > 1e-4 and timings["steps"][0] > 1e-3   # measured, not the 7e-07 of an empty span


def test_figures_trace_the_probes_network_and_batch():
    from gradflow.cli.figures import Config, trace_at_init
    units, _ = trace_at_init(Config("x", "resnet20", (("unit", "original"),)), 4, 5)
    res = run_probe(ProbeConfig(model="resnet20", options=dict(unit="original"), batch_size=4, seed=5,
                                progress=False))
    probed = next(iter(res.variants.values())).units
    np.testing.assert_array_equal(units["grad_ratio"].to_numpy(), probed["grad_ratio"].to_numpy())


def test_compare_sets_come_from_the_one_paper_table():
    from gradflow.models.paper import paper_rows
    from gradflow.cli.figures import table_configs
    t1 = parse_compare(["table1"])
    rows = [r for r in paper_rows("1") if not r.sweep]
    assert list(t1) == [r.label for r in rows] and len(t1) == 10
    assert {c.label for c in table_configs("1")} == {r.label for r in paper_rows("1")}


@pytest.mark.parametrize("model, options, compared", [
    ("resnet20", dict(unit="full_preact"), True),       # pre-activation units, BatchNorm: De & Smith's case
    ("resnet20", dict(unit="original"), False),         # ReLU after the addition
    ("gpt-tiny", dict(unit="pre_ln", n_layer=4), False),  # pre-activation, but LayerNorm
])
def test_variance_verdict_compares_de_and_smith_only_where_it_applies(model, options, compared):
    from gradflow.probe.report import verdicts
    extra = dict(seq_len=16) if model.startswith("gpt") else {}
    res = run_probe(ProbeConfig(model=model, options=options, batch_size=4, progress=False, **extra))
    v = next(iter(res.variants.values()))
    text = verdicts(v.summary, v.units, v.analysis)["variance"]
    if not compared:
        assert "not compared" in text and "holds" not in text
        return
    # the zoo table's rule (gradflow.probe.zoo) on the same fit: a line, better than an exponential
    from gradflow.probe.report import FIT_R2
    fit = v.summary["variance"]
    holds = fit["better_fit"] == "linear" and fit["linear"]["r2"] >= FIT_R2
    assert "De & Smith 2020's line for pre-activation BN nets" in text
    assert text.endswith("holds") == holds and text.endswith("does NOT hold") == (not holds)
