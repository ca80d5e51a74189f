"""The probe on transformers: token inputs for gpt-* and hf:TYPE models built from a config, timm ViTs
at the image size asked for, and one-line errors for what does not fit."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradflow.cli.probe import main
from gradflow.probe import ProbeConfig, build_model, run_probe
from gradflow.probe.inputs import synthetic_tokens


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def test_token_probe_feeds_tokens_and_scores_every_position():
    cfg = ProbeConfig(model="gpt-tiny", options={"unit": "post_ln", "n_layer": 2}, seq_len=16, batch_size=3,
                      progress=False)
    r = run_probe(cfg)
    assert r.config["seq_len"] == 16 and r.config["image_size"] is None
    assert "token ids" in r.inputs
    units = next(iter(r.variants.values())).units
    body = units[~units["is_top"]]
    assert list(body["name"]) == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    # independently: the same network and tokens, next-token loss over all positions, dE/dx_L by autograd
    m = build_model("gpt-tiny", {"unit": "post_ln", "n_layer": 2}, seed=0).module.train()
    (idx, targets), = synthetic_tokens(3, 1, 16, 256, seed=0)
    out = []
    h = m.blocks[-1].register_forward_hook(lambda mod, a, o: out.append(o))
    torch.manual_seed(0)
    loss = F.cross_entropy(m(idx).flatten(0, 1), targets.flatten())
    h.remove()
    (g,) = torch.autograd.grad(loss, out[0])
    top = units[units["is_top"]]
    np.testing.assert_allclose(top["grad_norm"].item(), g.flatten(1).norm(dim=1).mean().item(), rtol=1e-5)


def test_hf_model_built_from_config_says_which_head_count_it_chose():
    with pytest.warns(UserWarning, match="n_head=8"):
        b = build_model("hf:gpt2", {"n_layer": 2, "n_embd": 64}, seed=0)
    assert b.options == {"n_layer": 2, "n_embd": 64, "n_head": 8, "use_cache": False}
    assert b.tokens == {"vocab_size": 50257, "seq_len": 1024}
    r = run_probe(ProbeConfig(model="hf:llama", options={"num_hidden_layers": 2, "hidden_size": 32,
                                                         "intermediate_size": 64, "num_attention_heads": 2,
                                                         "num_key_value_heads": 1, "vocab_size": 128},
                              seq_len=8, batch_size=2, progress=False))
    units = next(iter(r.variants.values())).units
    assert list(units["name"][:-1]) == ["model.layers.0.attn", "model.layers.0.mlp", "model.layers.1.attn",
                                        "model.layers.1.mlp"]
    np.testing.assert_allclose(units["direct_ratio"], 1.0, rtol=1e-6)   # pre-LN: the direct term is dE/dx_L


def test_timm_vit_takes_the_image_size():
    b = build_model("timm:vit_tiny_patch16_224", {}, seed=0, image_size=32)
    assert b.image_size == 32 and tuple(b.module.patch_embed.img_size) == (32, 32)
    assert b.module(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    assert build_model("timm:resnet18", {}, seed=0, image_size=40).image_size == 40   # any size: no img_size


@pytest.mark.parametrize("argv,want", [
    (["--model", "gpt-tiny", "--seq-len", "65"], "exceeds the 64 positions"),
    (["--model", "gpt-tiny", "--image-size", "32"], "use --seq-len"),
    (["--model", "resnet20", "--seq-len", "8"], "takes images"),
    (["--model", "resnet20", "--hf-config", "n_layer=2"], "applies to hf:TYPE"),
    (["--model", "hf:gpt2", "--hf-config", "n_layr=2"], "did you mean n_layer"),
    (["--model", "hf:gpt9", "--hf-config", "n_layer=2"], "gpt9"),
    (["--model", "gpt-tiny", "--unit", "postln"], "postln"),
    (["--model", "gpt-tiny", "--compare", "unit=post_ln", "model=resnet20"], "one input kind"),
])
def test_bad_transformer_input_is_one_line_exit_2(argv, want, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path / "out"), "--batch-size", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradflow probe: error:") and want in err[0], err


def test_cli_compares_transformer_units_on_tokens(tmp_path):
    cmd = [sys.executable, "-m", "gradflow.probe", "--model", "gpt-tiny", "--compare", "unit=post_ln",
           "unit=pre_ln", "unit=deepnorm", "--seq-len", "16", "--batch-size", "2", "--out", str(tmp_path),
           "--json", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")   # tiny matrices: one thread, no spinning
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert [v["label"] for v in report["variants"]] == ["unit=post_ln", "unit=pre_ln", "unit=deepnorm"]
    assert report["config"]["seq_len"] == 16
    assert (tmp_path / "units.csv").is_file() and (tmp_path / "figure.png").is_file()
