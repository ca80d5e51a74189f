"""Xiong et al. 2020 Theorem 1 on the zoo's GPT: the measurement against plain autograd, the
sweep's bookkeeping, and the sqrt(L) growth of the post-LN / pre-LN ratio on a small sweep."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gradflow
from gradflow.models import GPT, TransformerSpec
from gradflow.cli.xiong import main
from gradflow.experiments.xiong import fit_exponent, last_layer_grad_norm, xiong_ratio, xiong_sweep

SMALL = dict(d_model=32, n_head=2, seq_len=16, batch=4)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def test_last_layer_grad_norm_is_the_last_fc2_gradient():
    torch.manual_seed(0)
    m = GPT(TransformerSpec(unit="post_ln"), vocab_size=64, seq_len=8, n_layer=3, d_model=16, n_head=2)
    x, y = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    w = m.blocks[2].mlp.branch.fc2.weight
    loss = F.cross_entropy(m(x).reshape(-1, 64), y.reshape(-1))
    (g,) = torch.autograd.grad(loss, w)
    assert last_layer_grad_norm(m, x, y) == pytest.approx(torch.linalg.matrix_norm(g).item(), rel=1e-6)


def test_sweep_pairs_units_on_the_same_weights_and_batch():
    s = xiong_sweep((1, 3), seeds=(0, 5), **SMALL)
    assert len(s) == 2 * 2 * 2 and set(s["unit"]) == {"post_ln", "pre_ln"}
    again = xiong_sweep((3,), seeds=(5,), **SMALL)     # a row does not depend on the others
    for unit in ("post_ln", "pre_ln"):
        a = s[(s.unit == unit) & (s.n_layer == 3) & (s.seed == 5)]["grad_norm"].item()
        assert again[again.unit == unit]["grad_norm"].item() == a
    r = xiong_ratio(s)
    mean = s.groupby(["n_layer", "unit"])["grad_norm"].mean()
    np.testing.assert_allclose(r["ratio"], [mean[(L, "post_ln")] / mean[(L, "pre_ln")] for L in (1, 3)])
    np.testing.assert_allclose(r["sqrt_L"], np.sqrt([1, 3]))


def test_the_ratio_grows_like_sqrt_L():
    # Theorem 1: post-LN's last-layer gradient does not shrink with L, pre-LN's falls like 1/sqrt(L)
    s = xiong_sweep((2, 8, 32), seeds=(0, 1), **SMALL)
    r = xiong_ratio(s)
    assert 0.3 < fit_exponent(r) < 0.7
    assert r["pre_ln"].is_monotonic_decreasing
    assert r["post_ln"].max() / r["post_ln"].min() < 1.5


def test_bad_sweeps_are_named():
    with pytest.raises(gradflow.GradflowError, match="depths"):
        xiong_sweep((0, 2))
    with pytest.raises(gradflow.GradflowError, match="deepnorm"):
        xiong_ratio(xiong_sweep((1,), seeds=(0,), **SMALL), den="deepnorm")


def test_cli_writes_figure_caption_and_table(tmp_path):
    assert main(["--out", str(tmp_path), "--depths", "1,2", "--seeds", "0", "--d-model", "16",
                 "--n-head", "2", "--seq-len", "8", "--batch", "2"]) == 0
    caption = (tmp_path / "xiong_post_vs_pre_ln.txt").read_text()
    for needed in ("command: python -m gradflow xiong --out", "seeds [0]",
                   "git commit", "hardware:", "torch:"):
        assert needed in caption
    assert (tmp_path / "xiong_post_vs_pre_ln.png").stat().st_size > 1000
    assert "ratio_over_sqrt_L" in (tmp_path / "xiong_post_vs_pre_ln.csv").read_text()
