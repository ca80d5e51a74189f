"""The transformer zoo: its units against their formulas, the tracer against plain autograd
and against the same network with every branch output detached (whose dE/dx_l is the direct term)."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradflow
from gradflow.probe.quantities import Structure
from gradflow.models import TRANSFORMER_UNITS, GPT, TransformerSpec, ViT
from tracing_helpers import per_sample_norm

VOCAB, T = 32, 8


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def tiny_gpt(unit="pre_ln", n_layer=3, **kw):
    torch.manual_seed(0)
    return GPT(TransformerSpec(unit=unit, **kw), vocab_size=VOCAB, seq_len=T, n_layer=n_layer,
               d_model=16, n_head=2)


def tiny_vit(unit="pre_ln", n_layer=2, **kw):
    torch.manual_seed(0)
    return ViT(TransformerSpec(unit=unit, **kw), image_size=8, patch_size=4, n_layer=n_layer, d_model=16,
               n_head=2, num_classes=5)


def tokens(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, T), generator=g), torch.randint(0, VOCAB, (n, T), generator=g)


def images(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def loss_of(logits, y):
    return F.cross_entropy(logits.flatten(0, -2), y.flatten())


# --- an independent forward: the units' formulas written out, optionally with F detached ----

def unit_by_formula(u, x, n_layer, detach_branch=False):
    """Unit u's output from the formulas of the module docstring (not run_parts)."""
    spec = u.spec
    r = u.branch(u.preact(x) if spec.unit == "pre_ln" else x)
    if detach_branch:
        r = r.detach()
    lam = spec.scale if spec.shortcut == "scale" else 1.0
    mu = 1.0 - lam if spec.shortcut == "scale" and spec.scale_branch else 1.0
    if spec.unit == "deepnorm":
        lam = (2.0 * n_layer) ** 0.25
    if spec.unit in ("rezero", "skipinit"):
        r = u.combine.gain * r
    y = lam * x + mu * r
    return u.post(y) if spec.unit in ("post_ln", "deepnorm") else y


def formula_forward(model, inp, detach_branch=False):
    """(logits, [x_0 .. x_{L-1}], x_L) of a GPT or ViT from the unit formulas."""
    if isinstance(model, GPT):
        h = model.tok_emb(inp) + model.pos_emb(torch.arange(inp.shape[1]))
    else:
        h = model.patch_embed(inp).flatten(2).transpose(1, 2) + model.pos_emb
    xs = []
    for u in model.units():
        xs.append(h)
        h = unit_by_formula(u, h, model.n_layer, detach_branch)
    z = model.ln_f(h)
    logits = model.head(z) if isinstance(model, GPT) else model.head(z.mean(1))
    return logits, xs, h


def autograd_reference(model, inp, y):
    """Per unit: x_l, dE/dx_l (plain autograd) and the direct term (branches detached); dE/dx_L."""
    logits, xs, x_L = formula_forward(model, inp)
    grads = torch.autograd.grad(loss_of(logits, y), xs + [x_L])
    logits_d, xs_d, x_L_d = formula_forward(model, inp, detach_branch=True)
    torch.testing.assert_close(logits_d, logits)       # detaching changes no forward value
    directs = torch.autograd.grad(loss_of(logits_d, y), xs_d)
    return xs + [x_L], list(grads), list(directs)


def traced(model, inp, y, **kw):
    with gradflow.trace(model, **kw) as tr:
        loss_of(model(inp), y).backward()
    return tr


def assert_per_sample(tr, column, expected, rtol=1e-4, atol=1e-7):
    s = tr.samples.sort_values(["unit", "sample"])
    for i, e in enumerate(expected):
        got = s.loc[s["unit"] == i, column].to_numpy()
        np.testing.assert_allclose(got, e.numpy(), rtol=rtol, atol=atol, err_msg=f"{column} at unit {i}")


# --- registry --------------------------------------------------------------------------------

def test_registered_transformers_and_their_inputs():
    assert set(gradflow.list_models("gpt*")) >= {"gpt-tiny", "gpt-small", "gpt-medium"}
    assert set(gradflow.list_models("vit-cifar*")) >= {"vit-cifar-tiny", "vit-cifar-small"}
    assert gradflow.model_inputs("gpt-small") == {"kind": "tokens", "vocab_size": 512, "seq_len": 128}
    assert gradflow.model_inputs("gpt-small", seq_len=64)["seq_len"] == 64
    assert gradflow.model_inputs("vit-cifar-tiny") == {"kind": "image", "channels": 3, "image_size": 32}
    assert gradflow.create_model("vit-cifar-tiny", image_size=16, patch_size=4).inputs["image_size"] == 16
    assert gradflow.model_inputs("resnet20")["kind"] == "image"
    assert set(gradflow.model_options("gpt-small")) >= {"unit", "shortcut", "scale", "n_layer", "seq_len"}


@pytest.mark.parametrize("name", gradflow.list_models("gpt*"))   # vit-cifar-*: test_models (images)
def test_every_registered_language_model_runs_forward_and_backward(name):
    m = gradflow.create_model(name)
    spec = gradflow.model_inputs(name)
    assert m.inputs == spec
    if spec["kind"] == "tokens":
        x = torch.randint(0, spec["vocab_size"], (2, 8))
        out = m(x)
        assert out.shape == (2, 8, spec["vocab_size"])
    else:
        out = m(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 10)
    out.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("kw,match", [(dict(unit="postln"), "postln"), (dict(shortcut="gate"), "gate"),
                                      (dict(unit="deepnorm", shortcut="scale"), "alpha"),
                                      (dict(init="he"), "he"), (dict(n_head=5), "n_head=5")])
def test_bad_options_are_named(kw, match):
    with pytest.raises(gradflow.GradflowError, match=match):
        gradflow.create_model("gpt-tiny", **kw)


def test_bad_inputs_are_named():
    m = gradflow.create_model("gpt-tiny")
    with pytest.raises(gradflow.GradflowError, match="seq_len=64"):
        m(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(gradflow.GradflowError, match="token ids"):
        m(torch.randn(1, 8))
    with pytest.raises(gradflow.GradflowError, match="image_size="):
        gradflow.create_model("vit-cifar-tiny")(torch.randn(1, 3, 64, 64))


# --- the units are their formulas ---------------------------------------------------------------

@pytest.mark.parametrize("unit,shortcut", [(u, s) for u in TRANSFORMER_UNITS for s in ("identity", "scale")
                                           if (u, s) != ("deepnorm", "scale")])  # refused: see above
def test_model_computes_its_unit_formulas(unit, shortcut):
    m = tiny_gpt(unit, shortcut=shortcut, scale=0.7, scale_branch=True, skip_init=0.3)
    with torch.no_grad():   # make ReZero's / SkipInit's scalar non-trivial
        for u in m.units():
            if u.combine.gain is not None:
                u.combine.gain.fill_(0.3)
    x, _ = tokens()
    torch.testing.assert_close(m(x), formula_forward(m, x)[0], rtol=1e-5, atol=1e-6)


def test_attention_is_causal():
    m = tiny_gpt("post_ln")
    x, _ = tokens()
    x2 = x.clone()
    x2[:, 5:] = (x2[:, 5:] + 1) % VOCAB
    a, b = m(x), m(x2)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_deepnorm_constants_and_beta_init():
    N = 3
    post, deep = tiny_gpt("post_ln", n_layer=N), tiny_gpt("deepnorm", n_layer=N)
    alpha, beta = (2 * N) ** 0.25, (8 * N) ** -0.25
    assert [u.shortcut_scalar() for u in deep.units()] == [pytest.approx(alpha)] * (2 * N)
    for bp, bd in zip(post.blocks, deep.blocks):   # same seed: the same draws, beta on four weights
        for name in ("attn.branch.v_proj", "attn.branch.out_proj", "mlp.branch.fc1", "mlp.branch.fc2"):
            torch.testing.assert_close(bd.get_submodule(name).weight, beta * bp.get_submodule(name).weight)
        for name in ("attn.branch.q_proj", "attn.branch.k_proj"):
            torch.testing.assert_close(bd.get_submodule(name).weight, bp.get_submodule(name).weight)


def test_rezero_is_the_identity_at_init_and_skipinit_takes_its_value():
    m = tiny_gpt("rezero")
    x, _ = tokens()
    x_0 = m.tok_emb(x) + m.pos_emb(torch.arange(T))
    torch.testing.assert_close(m.forward_features(x), x_0, rtol=0, atol=0)
    s = tiny_gpt("skipinit", skip_init=0.25)
    assert all(u.combine.gain.item() == 0.25 for u in s.units())
    assert not any(isinstance(mod, nn.LayerNorm) for mod in m.modules())


def test_scaled_shortcut_with_zero_branches_is_lambda_power():
    m = tiny_gpt("pre_ln", shortcut="scale", scale=0.5)
    for u in m.units():
        last = u.branch.out_proj if hasattr(u.branch, "out_proj") else u.branch.fc2
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    x, _ = tokens()
    x_0 = m.tok_emb(x) + m.pos_emb(torch.arange(T))
    torch.testing.assert_close(m.forward_features(x), 0.5 ** 6 * x_0)


# --- the tracer on the zoo's transformers -----------------------------------------------------

CASES = [("gpt", dict(unit=u)) for u in TRANSFORMER_UNITS] + [
    ("gpt", dict(unit="skipinit", skip_init=0.2)),
    ("gpt", dict(unit="pre_ln", shortcut="scale", scale=0.5)),
    ("gpt", dict(unit="post_ln", shortcut="scale", scale=0.8, scale_branch=True)),
    ("gpt", dict(unit="pre_ln", init="gpt2")),
    ("vit", dict(unit="post_ln")), ("vit", dict(unit="deepnorm")), ("vit", dict(unit="pre_ln"))]


@pytest.mark.parametrize("family,kw", CASES)
def test_every_recorded_number_and_the_direct_term(family, kw):
    m = tiny_gpt(**kw) if family == "gpt" else tiny_vit(**kw)
    inp, y = tokens() if family == "gpt" else images()
    tensors, grads, directs = autograd_reference(m, inp, y)
    tr = traced(m, inp, y)
    df = tr.units
    L = len(m.units())
    names = [f"blocks.{i // 2}.{'attn' if i % 2 == 0 else 'mlp'}" for i in range(L)]
    assert list(df["name"][:-1]) == names                     # two units per block, in order
    assert (df["stage"] == 0).all()                           # one stage: x_l keeps its shape
    assert_per_sample(tr, "x_norm", [per_sample_norm(t) for t in tensors])
    assert_per_sample(tr, "grad_norm", [per_sample_norm(g) for g in grads])
    top = per_sample_norm(grads[-1])
    assert_per_sample(tr, "grad_ratio", [per_sample_norm(g) / top for g in grads[:-1]])
    np.testing.assert_allclose(df["x_var"], [t.var(unbiased=False).item() for t in tensors], rtol=1e-4)
    assert_per_sample(tr, "direct_norm", [per_sample_norm(d) for d in directs])
    assert_per_sample(tr, "residual_norm", [per_sample_norm(g - d) for g, d in zip(grads, directs)],
                      rtol=1e-3, atol=1e-6)
    cos = [F.cosine_similarity(d.flatten(1), (g - d).flatten(1), dim=1) for g, d in zip(grads, directs)]
    zero_residual = any(u.combine.gain is not None and u.combine.gain.item() == 0 for u in m.units())
    if not zero_residual:   # ReZero's (SkipInit's at 0) residual is exactly zero: no cosine
        assert_per_sample(tr, "cos_direct_residual", cos, rtol=1e-3, atol=1e-4)


def test_pre_ln_direct_term_is_dE_dxL():
    m = tiny_gpt("pre_ln", n_layer=4)
    inp, y = tokens()
    _, grads, directs = autograd_reference(m, inp, y)
    for d in directs:                    # eq. (5)'s argument: the independent check ...
        torch.testing.assert_close(d, grads[-1], rtol=0, atol=0)
    s = traced(m, inp, y).samples        # ... and the tracer
    np.testing.assert_allclose(s["direct_ratio"], 1.0, rtol=1e-6)


def test_post_ln_direct_term_passes_through_every_LN():
    m = tiny_gpt("post_ln", n_layer=4)
    inp, y = tokens()
    df = traced(m, inp, y).units
    body = df[~df["is_top"]]
    # not the identity: the direct term is dE/dx_L times the LNs' Jacobians on the way
    assert (abs(body["direct_ratio"] - 1.0) > 1e-3).all()
    np.testing.assert_allclose(body["direct_ratio"], body["ref_ratio"], rtol=1e-6)  # coefficient 1


def test_rezero_residual_term_is_exactly_zero_at_init():
    m = tiny_gpt("rezero", n_layer=4)
    inp, y = tokens()
    s = traced(m, inp, y).samples
    body = s[s["unit"] < len(m.units())]
    assert (body["residual_norm"] == 0.0).all()
    np.testing.assert_array_equal(body["direct_norm"], body["grad_norm"])


def test_deepnorm_alpha_is_in_the_direct_term():
    N = 3
    m = tiny_gpt("deepnorm", n_layer=N)
    inp, y = tokens()
    tr = traced(m, inp, y, quantities=[Structure()])
    df = tr.units
    body = df[~df["is_top"]]
    alpha = (2 * N) ** 0.25
    L = 2 * N
    # direct = alpha^(L - l) x (dE/dx_L carried back through the LNs alone: the ref chain)
    np.testing.assert_allclose(body["direct_ratio"] / body["ref_ratio"], alpha ** (L - body["unit"]),
                               rtol=1e-5)
    np.testing.assert_allclose(body["scalar_coef"].astype(float), alpha)
    # a LayerNorm follows each addition (post-LN): f is not the identity, so eq. (8) does not cover
    # these units and no prediction is made for them (no value that holds by construction)
    joined = gradflow.theory.predict_direct(df)
    jb = joined[~joined["is_top"]]
    assert (jb["pred_basis"] == gradflow.theory.predict.NOT_F).all()
    assert jb["pred_direct_ratio"].isna().all()
    assert math.isnan(gradflow.theory.predicted_rate(df))


def test_scaled_shortcut_direct_term_is_prod_lambda():
    m = tiny_gpt("pre_ln", n_layer=3, shortcut="scale", scale=0.5)
    inp, y = tokens()
    df = traced(m, inp, y, quantities=[Structure()]).units
    body = df[~df["is_top"]]
    np.testing.assert_allclose(body["direct_ratio"], 0.5 ** (6 - body["unit"]), rtol=1e-5)
    assert math.isclose(gradflow.theory.predicted_rate(df), math.log(0.5))
