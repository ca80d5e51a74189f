"""The lesion study against networks rebuilt by hand: branches deleted, blocks skipped, units reordered."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradflow
from gradflow.experiments.lesion import (error_rate, kendall_tau, lesion_study, plain_blocks, removed, reordered,
                             residual_blocks, swap_pairs)


from tracing_helpers import one_thread  # noqa: E402,F401  (autouse: one torch thread per module)


def images(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def test_deleting_every_branch_gives_the_identity_network():
    """Full pre-activation, option-A shortcuts: with every branch gone the net is stem, strided
    zero-padded identities, the final BN-ReLU and the head, computed here by hand."""
    m = gradflow.create_model("resnet20", width=0.25, downsample="pad").eval()
    x = images()
    blocks = residual_blocks(m)
    with torch.no_grad(), removed(blocks, range(len(blocks))):
        got = m(x)
    with torch.no_grad():
        h = m.stem(x)
        for u in m.units():
            if u.stride > 1 or u.in_channels != u.out_channels:
                h = F.pad(h[:, :, ::u.stride, ::u.stride], (0, 0, 0, 0, 0, u.out_channels - u.in_channels))
        expect = m.fc(m.head_act(h).mean((2, 3)))
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    assert not any("forward" in u.__dict__ for u in m.units())     # everything restored


def test_deleted_branch_keeps_the_shortcut_coefficient_and_post():
    """Original units, lambda = 0.5: a unit without its branch is ReLU(0.5 h(x))."""
    m = gradflow.create_model("resnet20", width=0.25, unit="original", shortcut="scale", scale=0.5).eval()
    x = images()
    blocks = residual_blocks(m)
    with torch.no_grad(), removed(blocks, range(len(blocks))):
        got = m(x)
    with torch.no_grad():
        h = m.stem(x)
        for u in m.units():
            h = torch.relu(0.5 * (u.shortcut(h) if not isinstance(u.shortcut, nn.Identity) else h))
        expect = m.fc(h.mean((2, 3)))
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


def test_single_removal_and_reordering_match_rebuilt_networks():
    m = gradflow.create_model("resnet20", width=0.25).eval()
    x = images()
    blocks = residual_blocks(m)
    ref = copy.deepcopy(m)
    ref.stages[0][1] = nn.Identity()          # full pre-activation identity unit: shortcut only = x
    with torch.no_grad(), removed(blocks, [1]):
        torch.testing.assert_close(m(x), ref(x))
    ref = copy.deepcopy(m)
    s = ref.stages[1]
    ref.stages[1] = nn.Sequential(s[0], s[2], s[1])
    order = list(range(9))
    order[4], order[5] = 5, 4
    with torch.no_grad(), reordered(blocks, order):
        torch.testing.assert_close(m(x), ref(x))
    assert kendall_tau(order) == pytest.approx(1 - 2 * 1 / 36)   # one discordant pair of 36
    assert kendall_tau(list(range(9))) == 1.0


def test_study_tables_residual_and_plain():
    torch.manual_seed(0)
    x, y = images(16), torch.randint(0, 10, (16,))
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    m = gradflow.create_model("resnet20", width=0.25).eval()
    r = lesion_study(m, batches, ks=(1, 3, 20), draws=2, swaps=(1, 2), seed=0)
    assert r.baseline == error_rate(m, batches)
    assert len(r.single) == 9 and r.single["error"].notna().all()
    assert list(r.single["downsampling"]) == [False, False, False, True, False, False, True, False, False]
    assert sorted(r.random["k"].unique()) == [1, 3] and any("k=20 skipped" in n for n in r.notes)
    assert set(r.reorder["swaps"]) == {1, 2} and (r.reorder["kendall_tau"] <= 1).all()
    p = gradflow.create_model("plain20", width=0.25).eval()
    rp = lesion_study(p, batches, blocks=plain_blocks(p), ks=(1,), draws=2, swaps=(1,))
    assert rp.single["error"].isna().sum() == 2          # the two blocks that change the shape
    assert "block3" in set(rp.single.loc[rp.single["error"].isna(), "name"])
    tab = r.table()
    assert set(tab["study"]) == {"single", "random", "reorder"}


def test_swaps_stay_within_a_stage_and_shape():
    m = gradflow.create_model("resnet20", width=0.25).eval()
    blocks = residual_blocks(m)
    from gradflow.experiments.lesion import _shapes
    _shapes(m, blocks, images(2))
    pairs = swap_pairs(blocks)
    assert pairs and all(blocks[a].stage == blocks[b].stage and a not in (3, 6) and b not in (3, 6)
                         for a, b in pairs)


# --- command line ------------------------------------------------------------------------------

def _run(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")     # a tiny net: threads would only contend
    return subprocess.run([sys.executable, "-m", "gradflow", "lesion", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env=env)


def test_cli_end_to_end_and_bad_input(tmp_path):
    from gradflow.data.cifar import synthetic_cifar
    from gradflow.runs.checkpoint import save_checkpoint
    torch.manual_seed(0)
    m = gradflow.create_model("resnet20", width=0.25, num_classes=10)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "checkpoint.pt", dict(model="resnet20", options=dict(width=0.25, num_classes=10),
                                                model_state=m.state_dict(), config=dict(dataset="cifar10", seed=0),
                                                step=0, epoch=0))
    data = synthetic_cifar(tmp_path / "data", n_train=32, n_test=40)
    out = tmp_path / "out"
    r = _run("--checkpoint", str(run), "--data", str(data), "--no-verify", "--ks", "1,2", "--swaps", "1",
             "--draws", "1", "--out", str(out), "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["networks"][0]["network"] == "resnet20"
    assert (out / "lesion.csv").is_file() and (out / "summary.json").is_file()


@pytest.mark.parametrize("args,words", [(["--ks", "one"], "--ks"), (["--draws", "0"], "--draws"),
                                        (["--checkpoint", "NOPE"], "no checkpoint"),
                                        (["--data", "NODATA"], "--data")])
def test_cli_bad_input_exits_2(tmp_path, capsys, args, words):
    from gradflow.cli.lesion import main
    from gradflow.runs.checkpoint import save_checkpoint
    m = gradflow.create_model("resnet20", width=0.25)
    save_checkpoint(tmp_path / "c.pt", dict(model="resnet20", options=dict(width=0.25), model_state=m.state_dict(),
                                           config=dict(dataset="cifar10")))
    base = {"--checkpoint": str(tmp_path / "c.pt"), "--data": str(tmp_path / "d")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = str(tmp_path / v) if v.isupper() else v
    assert main([a for kv in base.items() for a in kv] + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradflow lesion: error:") and words in err


def test_torchvision_and_timm_blocks_lose_their_branches():
    """torchvision: with every branch gone a BasicBlock is relu(downsample(x)) or relu(x), by hand here."""
    tv = pytest.importorskip("torchvision")
    m = tv.models.resnet18(num_classes=10).eval()
    x = images(2)
    blocks = residual_blocks(m)
    assert len(blocks) == 8
    with torch.no_grad():
        ref = m(x)
        with removed(blocks, range(8)):
            got = m(x)
        h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            for b in layer:
                h = torch.relu(b.downsample(h) if b.downsample is not None else h)
        expect = m.fc(torch.flatten(m.avgpool(h), 1))
        torch.testing.assert_close(got, expect)
        torch.testing.assert_close(m(x), ref)            # restored
    timm = pytest.importorskip("timm")
    t = timm.create_model("resnetv2_18", pretrained=False, num_classes=10).eval()
    r = lesion_study(t, [(x, torch.tensor([0, 1]))], ks=(1,), draws=1, swaps=(1,))
    assert len(r.single) == len(residual_blocks(t)) and r.single["error"].notna().all()
