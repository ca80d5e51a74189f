"""Third-party transformer and ConvNeXt blocks, found with no declaration: one unit per residual
addition, every recorded number against plain autograd on the untraced model, and the direct term
against the same model with every residual branch's output detached (forward hooks)."""
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gradflow
from tracing_helpers import per_sample_norm

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
from timm.models.vision_transformer import (ParallelScalingBlock, ParallelThingsBlock,  # noqa: E402
                                            ResPostBlock, VisionTransformer)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# --- the independent computation: hooks on the untraced model ------------------------------

def _first(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _detached(module, args, out):
    if isinstance(out, tuple):
        return (out[0].detach(),) + out[1:]
    return out.detach()


def reference(model, loss_fn, x_modules, top, detach):
    """Unit inputs x_l (pre-hooks on ``x_modules``, in call order; ``("out", module)`` takes a
    module's output instead) and x_L (``top``'s output), dE/dx by autograd; and the direct terms:
    dE/dx_l of the same model with ``detach``'s outputs detached."""
    def run(detach_branches):
        xs, tops = [], []
        hs = [m[1].register_forward_hook(lambda m, a, o: xs.append(o[0] if isinstance(o, tuple) else o))
              if isinstance(m, tuple) else
              m.register_forward_pre_hook(lambda m, a, kw: xs.append(_first(a, kw)), with_kwargs=True)
              for m in x_modules]
        hs.append(top.register_forward_hook(lambda m, a, o: tops.append(o[0] if isinstance(o, tuple) else o)))
        if detach_branches:
            hs += [m.register_forward_hook(_detached) for m in detach]
        try:
            torch.manual_seed(0)
            loss = loss_fn(model)
        finally:
            for h in hs:
                h.remove()
        return xs + tops[-1:], torch.autograd.grad(loss, xs + tops[-1:])
    tensors, grads = run(False)
    _, directs = run(True)
    return tensors, list(grads), list(directs[:-1])


def traced(model, loss_fn):
    with gradflow.trace(model) as tr:
        torch.manual_seed(0)
        loss_fn(model).backward()
    return tr


def check_against_autograd(model, loss_fn, x_modules, top, detach, names, train=False):
    # dropout off: the same function on every run (train-mode BN-free models); train=True keeps
    # training mode (for its own code paths, such as activation checkpointing) with dropout at 0
    model.train(train)
    with torch.no_grad():
        torch.manual_seed(0)
        plain = _logits(model)
    tensors, grads, directs = reference(model, loss_fn, x_modules, top, detach)
    tr = traced(model, loss_fn)
    df = tr.units
    assert list(df["name"][:-1]) == names
    s = tr.samples.sort_values(["unit", "sample"])

    def per_sample(col, expected, rtol=1e-4, atol=1e-7):
        for i, e in enumerate(expected):
            got = s.loc[s["unit"] == i, col].to_numpy()
            np.testing.assert_allclose(got, e.numpy(), rtol=rtol, atol=atol, err_msg=f"{col} at unit {i}")
    per_sample("x_norm", [per_sample_norm(t) for t in tensors])
    per_sample("grad_norm", [per_sample_norm(g) for g in grads])
    top_norm = per_sample_norm(grads[-1])
    per_sample("grad_ratio", [per_sample_norm(g) / top_norm for g in grads[:-1]])
    per_sample("direct_norm", [per_sample_norm(d) for d in directs])
    per_sample("residual_norm", [per_sample_norm(g - d) for g, d in zip(grads, directs)], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(df["x_var"], [t.var(unbiased=False).item() for t in tensors], rtol=1e-4)
    with gradflow.trace(model, split=False), torch.no_grad():   # the traced forward is the model's own
        torch.manual_seed(0)
        assert torch.equal(_logits(model), plain)
    return tr


_INPUTS = weakref.WeakKeyDictionary()   # keyed by the model itself: an id() is reused once a model is freed
_IMAGES = {}


def _logits(model):
    out = model(**_INPUTS[model]) if model in _INPUTS else model(_IMAGES["images"])
    return out.logits if hasattr(out, "logits") else out


def _lm_loss(model):
    ids = _INPUTS[model]["input_ids"]
    return F.cross_entropy(_logits(model).flatten(0, 1), ids.roll(-1, 1).flatten())


def _cls_loss(model):
    return F.cross_entropy(_logits(model), torch.tensor([0, 1, 2, 0]))


def _tokens(model, vocab=64, mask=False, use_cache=False):
    g = torch.Generator().manual_seed(1)
    inp = {"input_ids": torch.randint(0, vocab, (4, 8), generator=g), "use_cache": use_cache}
    if mask:
        m = torch.ones(4, 8, dtype=torch.long)
        m[0, 6:] = 0
        inp["attention_mask"] = m
    _INPUTS[model] = inp
    return model


def _images():
    _IMAGES["images"] = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _names(prefix, n, slots):
    return [f"{prefix}.{i}.{s}" if s else f"{prefix}.{i}" for i in range(n) for s in slots]


# --- Hugging Face --------------------------------------------------------------------------------

def _gpt2(**kw):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0, **kw)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("mask", [False, True])
def test_hf_gpt2(mask):
    m = _tokens(_gpt2(), mask=mask)
    blocks = list(m.transformer.h)
    check_against_autograd(m, _lm_loss, [x for b in blocks for x in (b.ln_1, b.ln_2)], blocks[-1],
                           [x for b in blocks for x in (b.attn, b.mlp)], _names("transformer.h", 2, ("attn", "mlp")))


def test_hf_gpt2_cross_attention_is_a_third_unit():
    m = _tokens(_gpt2(add_cross_attention=True))
    _INPUTS[m]["encoder_hidden_states"] = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(2))
    blocks = list(m.transformer.h)
    check_against_autograd(m, _lm_loss, [x for b in blocks for x in (b.ln_1, b.ln_cross_attn, b.ln_2)], blocks[-1],
                           [x for b in blocks for x in (b.attn, b.crossattention, b.mlp)],
                           _names("transformer.h", 2, ("attn", "crossattention", "mlp")))


def test_hf_gpt2_with_its_default_cache():
    m = _tokens(_gpt2(), use_cache=True)
    blocks = list(m.transformer.h)
    check_against_autograd(m, _lm_loss, [x for b in blocks for x in (b.ln_1, b.ln_2)], blocks[-1],
                           [x for b in blocks for x in (b.attn, b.mlp)], _names("transformer.h", 2, ("attn", "mlp")))


def test_hf_gpt2_with_gradient_checkpointing():
    """Hugging Face's activation checkpointing re-runs each block inside the backward: same rows."""
    m = _tokens(_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
    reruns = []
    hooks = [b.attn.register_forward_pre_hook(lambda *a: reruns.append(torch._C._current_graph_task_id() != -1))
             for b in m.transformer.h]
    blocks = list(m.transformer.h)
    check_against_autograd(m, _lm_loss, [x for b in blocks for x in (b.ln_1, b.ln_2)], blocks[-1],
                           [x for b in blocks for x in (b.attn, b.mlp)], _names("transformer.h", 2, ("attn", "mlp")),
                           train=True)
    for h in hooks:
        h.remove()
    assert any(reruns)   # the blocks were re-run inside backward passes: checkpointing was on


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_hf_llama_family(family):
    cfg_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config}[family]
    model_cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                 "qwen2": transformers.Qwen2ForCausalLM}[family]
    torch.manual_seed(0)
    cfg = cfg_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=64, max_position_embeddings=16, bos_token_id=0,
                  eos_token_id=0, pad_token_id=0)
    m = _tokens(model_cls(cfg), mask=True)
    layers = list(m.model.layers)
    check_against_autograd(m, _lm_loss, [x for l in layers for x in (l.input_layernorm, l.post_attention_layernorm)],
                           layers[-1], [x for l in layers for x in (l.self_attn, l.mlp)],
                           _names("model.layers", 2, ("attn", "mlp")))


@pytest.mark.parametrize("family,chunk", [("bert", 0), ("bert", 4), ("roberta", 0)])
def test_hf_bert_family_is_post_ln(family, chunk):
    cfg_cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}[family]
    model_cls = {"bert": transformers.BertForSequenceClassification,
                 "roberta": transformers.RobertaForSequenceClassification}[family]
    torch.manual_seed(0)
    cfg = cfg_cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  vocab_size=64, max_position_embeddings=20, num_labels=3, chunk_size_feed_forward=chunk,
                  pad_token_id=1)
    m = _tokens(model_cls(cfg), mask=True)
    _INPUTS[m]["input_ids"] = _INPUTS[m]["input_ids"].clamp_min(2)
    layers = list(getattr(m, family).encoder.layer)
    tr = check_against_autograd(m, _cls_loss, [x for l in layers for x in (l, ("out", l.attention))], layers[-1],
                                [x for l in layers for x in (l.attention.output.dense, l.output.dense)],
                                _names(f"{family}.encoder.layer", 2, ("attention", "output")))
    body = tr.units[~tr.units["is_top"]]
    assert (abs(body["direct_ratio"] - 1) > 1e-4).all()   # through every LayerNorm: not the identity


# --- timm ------------------------------------------------------------------------------------------

def _vit(block_fn=None, **kw):
    torch.manual_seed(0)
    if block_fn is None:
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                                 embed_dim=32, num_heads=2, num_classes=3, **kw)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3,
                             block_fn=block_fn, **kw)


@pytest.mark.parametrize("kw", [dict(), dict(init_values=0.1)])
def test_timm_vit_block(kw):
    _images()
    m = _vit(**kw)
    blocks = list(m.blocks)
    check_against_autograd(m, _cls_loss, [x for b in blocks for x in (b.norm1, b.norm2)], blocks[-1],
                           [x for b in blocks for x in (b.attn, b.mlp)], _names("blocks", 2, ("attn", "mlp")))


def test_timm_res_post_block():
    _images()
    m = _vit(ResPostBlock)
    blocks = list(m.blocks)
    check_against_autograd(m, _cls_loss, [x for b in blocks for x in (b.attn, b.mlp)], blocks[-1],
                           [x for b in blocks for x in (b.attn, b.mlp)], _names("blocks", 2, ("attn", "mlp")))


def test_timm_parallel_things_block():
    _images()
    m = _vit(ParallelThingsBlock)
    blocks = list(m.blocks)
    check_against_autograd(m, _cls_loss, [x for b in blocks for x in (b.attns[0], b.ffns[0])], blocks[-1],
                           [x for b in blocks for x in (*b.attns, *b.ffns)], _names("blocks", 2, ("attn", "mlp")))


def test_timm_parallel_scaling_block_is_one_unit_and_says_so():
    _images()
    m = _vit(ParallelScalingBlock)
    blocks = list(m.blocks)
    from gradflow.tracing import adapters_transformers as at
    at._SAID.discard("ParallelScalingBlock")
    with pytest.warns(UserWarning, match="ONE residual addition"):
        check_against_autograd(m, _cls_loss, [b.in_norm for b in blocks], blocks[-1], [b.in_proj for b in blocks],
                               _names("blocks", 2, ("",)))


@pytest.mark.parametrize("conv_mlp", [True, False])
def test_timm_convnext(conv_mlp):
    _images()
    torch.manual_seed(0)
    m = timm.create_model("convnext_atto", pretrained=False, num_classes=3, depths=(1, 1, 2, 1),
                          dims=(8, 16, 24, 32), conv_mlp=conv_mlp, ls_init_value=0.5)
    blocks = [b for s in m.stages for b in s.blocks]
    names = ["stages.0.blocks.0", "stages.1.blocks.0", "stages.2.blocks.0", "stages.2.blocks.1", "stages.3.blocks.0"]
    tr = check_against_autograd(m, _cls_loss, [b.conv_dw for b in blocks], blocks[-1], [b.mlp for b in blocks], names)
    body = tr.units[~tr.units["is_top"]]
    assert list(body["stage"]) == [0, 1, 2, 2, 3]          # stages by x_l's shape, not by block
