"""Trainability predictors against closed forms on a tiny linear residual network, the rank check
on constructed outcomes, the outcome reader on synthetic run folders, and the command line."""
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gradflow.tracing.parts import Parts, run_parts
from gradflow.trainability import PREDICTORS, laptop_outcome, laptop_runs, measure, rank_check, variants
from gradflow.trainability.predictors import gradient_correlation, paired_batch

D, N_UNITS, C = 12, 4, 5


class LinearUnit(nn.Module):
    """x_{l+1} = lam * x_l + W_l x_l: J_l = lam I + W_l, a closed form for everything."""

    stage = 0

    def __init__(self, lam: float, w: torch.Tensor):
        super().__init__()
        self.lin = nn.Linear(D, D, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(w)
        self.lam = lam

    def parts(self):
        return Parts(branch=self.lin, combine=lambda h, r, x: (self.lam * h + r, self.lam))

    def forward(self, x):
        return run_parts(self.parts(), x)


class LinearNet(nn.Module):
    def __init__(self, lam: float, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ws = [0.3 * torch.randn(D, D, generator=g) / math.sqrt(D) for _ in range(N_UNITS)]
        self.units = nn.ModuleList(LinearUnit(lam, w) for w in self.ws)
        self.head = nn.Linear(D, C, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(C, D, generator=g) / math.sqrt(D))
        self.lam = lam

    def forward(self, x):
        for u in self.units:
            x = u(x)
        return self.head(x)


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_predictors_match_closed_forms_on_a_linear_residual_net(lam):
    net = LinearNet(lam)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, D, generator=g), torch.randint(0, C, (64,), generator=g)
    got = measure(net, [(x, y)], seed=0, eps=1e-3, probes=64)
    # the same paired batch, by hand
    xb, yb = paired_batch(x, y, 1e-3, torch.Generator().manual_seed(0))
    js = [lam * torch.eye(D) + w for w in net.ws]             # J_l, x_{l+1} = J_l x_l
    m = torch.eye(D)
    for j in js:
        m = j @ m                                            # x_L = M x_0
    xl = xb @ m.T
    z = xl.detach().requires_grad_()
    (g_top,) = torch.autograd.grad(F.cross_entropy(net.head(z), yb), z)   # dE/dx_L
    g0 = g_top @ m                                           # dE/dx_0 = M^T dE/dx_L, per row
    direct = lam ** N_UNITS * g_top
    assert got["direct_share"] == pytest.approx(float(direct.norm(dim=1).mean() / g0.norm(dim=1).mean()), rel=1e-4)
    ratio = float((g0.norm(dim=1) / g_top.norm(dim=1)).mean())
    assert got["total_growth"] == pytest.approx(abs(math.log10(ratio)), rel=1e-4, abs=1e-6)
    gsc = ratio * float(xb.norm(dim=1).mean()) / float(xl.norm(dim=1).mean())
    assert got["gsc"] == pytest.approx(math.log10(gsc), rel=1e-4, abs=1e-6)
    dist = np.mean([float((j - torch.eye(D)).norm()) / math.sqrt(D) for j in js])
    assert got["jacobian_distance"] == pytest.approx(dist, rel=0.05)      # Hutchinson, 64 x 64 x 12 draws
    # dE/dx_0 at each input and its moved copy, by plain autograd on the whole net
    xg = xb.clone().requires_grad_()
    (gx,) = torch.autograd.grad(F.cross_entropy(net(xg), yb), xg)
    a, b = gx[:64].double(), gx[64:].double()
    corr = np.mean([float(np.corrcoef(a[i].numpy(), b[i].numpy())[0, 1]) for i in range(64)])
    assert got["gradient_correlation"] == pytest.approx(corr, abs=1e-6)


def test_gradient_correlation_of_known_pairs():
    g = torch.randn(8, 50)
    assert gradient_correlation(torch.cat([g, g])) == pytest.approx(1.0)
    assert gradient_correlation(torch.cat([g, -g])) == pytest.approx(-1.0)
    assert abs(gradient_correlation(torch.randn(2000, 4000))) < 0.01


def _predictors(values: dict, seeds=3, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for v, base in values.items():
        for s in range(seeds):
            row = {"variant": v, "seed": s}
            for p in PREDICTORS:
                row[p.name] = p.sign * (base + noise * rng.normal())
            rows.append(row)
    return pd.DataFrame(rows)


def test_rank_check_verdicts_on_constructed_outcomes():
    names = [f"v{i}" for i in range(10)]
    preds = _predictors({n: float(i) for i, n in enumerate(names)})       # badness = i
    right = {n: [10.0 + 5 * i + d for d in (-0.5, 0.0, 0.5)] for i, n in enumerate(names)}
    wrong = {n: [60.0 - 5 * i] for i, n in enumerate(names)}
    t, _ = rank_check(preds, right, "right", replicates=100)
    assert (t["spearman"] == 1.0).all() and (t["verdict"] == "predicts").all()
    assert t["spearman_low"].min() > 0.5
    t, _ = rank_check(preds, wrong, "wrong", replicates=100)
    assert (t["spearman"] == -1.0).all() and (t["verdict"] == "fails (wrong way)").all()
    rng = np.random.default_rng(5)
    noise = {n: [float(v)] for n, v in zip(names, rng.permutation(10))}
    t, _ = rank_check(preds, noise, "noise", replicates=100)
    assert t["verdict"].str.startswith("fails").all() or (t["p_permutation"] < 0.05).all()


def test_rank_check_says_which_variants_have_no_outcome():
    preds = _predictors({"a": 0.0, "b": 1.0, "c": 2.0, "d": 3.0})
    _, notes = rank_check(preds, {"a": [1.0], "b": [2.0], "c": [3.0]}, "x", replicates=10)
    assert any("d" in n and "left out" in n for n in notes)


def _run(folder, seed, losses, errors, status="ok"):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"config": {"seed": seed, "dataset": "cifar10",
                                                               "model": "resnet110", "stop": 400}}))
    with open(folder / "log.jsonl", "w") as f:
        for i, (l, e) in enumerate(zip(losses, errors)):
            f.write(json.dumps({"iteration": 50 * (i + 1), "train_loss": l, "test_error": e}) + "\n")
    (folder / "status.json").write_text(json.dumps({"status": status}))


def test_laptop_runs_flag_diverged_runs_at_chance(tmp_path):
    vs = variants(["table1", "table2"])
    names = [v.name for v in vs]
    assert len(vs) == 25 and "original" in names and "resnet110-original" not in names   # one network, once
    base = tmp_path / "table1-laptop" / "runs"
    _run(base / "table1-original-seed0", 0, [2.2, 1.8, 1.5, 1.3], [0.8, 0.7, 0.6, 0.55])
    _run(base / "table1-original-seed1", 1, [2.2, 1.8, 4.0, 2.31], [0.8, 0.7, 0.9, 0.9])      # spike, stuck
    _run(tmp_path / "table2-laptop" / "runs" / "table2-resnet110-original-seed2", 2,
         [2.2, float("nan")], [0.8, None], status="diverged")                                  # NaN
    runs = laptop_runs(vs, tmp_path)
    assert sorted(runs["seed"]) == [0, 1, 2] and set(runs["variant"]) == {"original"}
    by_seed = runs.set_index("seed")
    assert by_seed.loc[0, "error"] == pytest.approx(55.0) and not by_seed.loc[0, "diverged"]
    assert by_seed.loc[1, "diverged"] and by_seed.loc[1, "error"] == pytest.approx(90.0)
    assert "spike" in by_seed.loc[1, "note"]
    assert by_seed.loc[2, "diverged"] and "NaN" in by_seed.loc[2, "note"]
    assert laptop_outcome(runs)["original"] == pytest.approx([55.0, 90.0, 90.0])
    # Table 2's ResNet-110 original at seed 0 is Table 1's identity row at seed 0: one training seed
    _run(tmp_path / "table2-laptop" / "runs" / "table2-resnet110-original-seed0", 0, [2.2, 1.4], [0.8, 0.5])
    runs = laptop_runs(vs, tmp_path)
    assert len(runs) == 4 and runs["repeat"].sum() == 1
    assert runs[runs["repeat"]].iloc[0]["row"] == "table2-resnet110-original"
    assert laptop_outcome(runs)["original"] == pytest.approx([55.0, 90.0, 90.0])


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gradflow", "trainability", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_cli_bad_input_exits_2(tmp_path, capsys):
    from gradflow.cli.trainability import main
    r = _cli("table9")                       # through python -m gradflow's command table
    assert r.returncode == 2 and "'table9'" in r.stderr and "table1" in r.stderr
    assert main(["table1", "--seeds", "0"]) == 2 and "--seeds 0" in capsys.readouterr().err
    assert main(["table1", "--runs", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["table1", "--device", "gpu0"]) == 2 and "'gpu0'" in capsys.readouterr().err


def test_cli_from_a_predictor_table_and_runs(tmp_path):
    vs = variants(["table2"])
    rng = np.random.default_rng(0)
    preds = _predictors({v.name: float(i) for i, v in enumerate(vs)}, noise=0.1)
    preds["growth_law"] = "exponential"
    preds.to_csv(tmp_path / "p.csv", index=False)
    for i, v in enumerate(vs):
        for s in range(2):
            e = min(0.3 + 0.05 * i + 0.01 * rng.normal(), 0.85)
            folder = tmp_path / "runs" / "table2-laptop" / "runs" / f"{v.rows[0]}-seed{s}"
            if i == len(vs) - 1:             # the worst variant diverges in both seeds: two crosses
                _run(folder, s, [2.0, float("nan")], [e + 0.1, None], status="diverged")
            else:
                _run(folder, s, [2.0, 1.5, 1.2], [e + 0.1, e + 0.05, e])
    from gradflow.cli.trainability import main
    assert main(["table2", "--predictors", str(tmp_path / "p.csv"), "--runs", str(tmp_path / "runs"),
                 "--out", str(tmp_path / "out"), "--replicates", "200"]) == 0
    t = pd.read_csv(tmp_path / "out" / "trainability_check.csv")
    assert set(t["outcome"]) == {"laptop", "paper"}
    lap = t[t.outcome == "laptop"]
    assert (lap["variants"] == 10).all() and (lap["spearman"] > 0.9).all()
    assert (tmp_path / "out" / "trainability.png").stat().st_size > 0
    text = (tmp_path / "out" / "trainability.txt").read_text()
    assert "2 diverged (counted at chance error)" in text
    assert "laptop: 7 of 7 predictors" in text and "command: python -m gradflow trainability table2" in text


def test_measure_runs_on_a_zoo_network():
    import gradflow
    torch.manual_seed(0)
    net = gradflow.create_model("resnet20", unit="full_preact", width=0.25)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    got = measure(net, [(x, y)], seed=0)
    assert 0 < got["direct_share"] <= 1.0 + 1e-6
    assert np.isfinite([got[p.name] for p in PREDICTORS]).all()
    assert got["growth_law"] in ("exponential", "power")
    assert all(p.requires_grad for p in net.parameters()) and net.training    # the model is as it was


def test_two_variants_are_not_tested_and_say_so():
    from gradflow.trainability.report import lines
    preds = _predictors({"a": 0.0, "b": 1.0, "c": 2.0})
    t, _ = rank_check(preds, {"a": [10.0], "b": [20.0]}, "laptop", replicates=20)
    assert (t["verdict"] == "not tested (too few variants)").all()
    assert lines(t, [], None)[0].startswith("laptop: not tested: 2 variant(s)")
