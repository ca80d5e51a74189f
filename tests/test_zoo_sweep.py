"""The zoos, swept the way timm's tests sweep ``list_models()``: units found as each network runs,
every number checked against plain autograd (see ``zoo_check.check_network``).

torchvision and timm networks are built with ``pretrained=False`` and small
inputs, Hugging Face ones from tiny configs (decoders, encoders, an
encoder-decoder, vision). The default tier is a few of each kind; the rest are
``slow``. Activations are exact GELUs in the Hugging Face configs, so that
autograd's "one operand is computed from the other" (the oracle's test) and
gradflow's "through a learned branch" name the same additions (the tanh GELU's
``x + 0.044715 * x**3`` is the first and not the second; tests/test_discovery.py
checks it is refused).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from zoo_check import check_network

# the wide sweep: in the default run; alone: python -m pytest -m sweep (see docs/discovery.md)
slow = pytest.mark.slow
sweep = [pytest.mark.slow, pytest.mark.sweep]

# name -> image size (timm models built with img_size= where they take it)
TIMM_FAST = {"vit_tiny_patch16_224": 32, "convnextv2_atto": 32, "resnet18": 32}
TIMM_SLOW = {"mobilevit_xxs": 64, "repvgg_a0": 32,
    "resnet10t": 32, "resnet26d": 32, "seresnet18": 32, "resnext26ts": 32, "res2net50_14w_8s": 32,
    "resnest14d": 32, "skresnet18": 32, "nf_resnet26": 32, "dla34": 32, "dpn68": 32, "cspresnet50": 32,
    "gernet_s": 32, "regnetx_002": 32, "regnety_002": 32, "rexnet_100": 32, "efficientnet_b0": 32,
    "mobilenetv2_050": 32, "mobilenetv3_small_050": 32, "ghostnet_050": 32, "mixnet_s": 32,
    "hrnet_w18_small": 64, "convnext_atto": 32, "deit_tiny_patch16_224": 32, "pit_ti_224": 64,
    "cait_xxs24_224": 32, "xcit_nano_12_p16_224": 32, "eva02_tiny_patch14_224": 28, "pvt_v2_b0": 64,
    "mixer_s32_224": 64, "resmlp_12_224": 32, "gmlp_ti16_224": 32, "poolformer_s12": 64,
    "poolformerv2_s12": 64, "mobilevitv2_050": 64, "edgenext_xx_small": 64, "efficientformer_l1": 224,
    "efficientformerv2_s0": 64, "fastvit_t8": 64, "efficientvit_b0": 64, "efficientvit_m0": 64,
    "levit_128s": 224, "coat_lite_tiny": 64, "twins_pcpvt_small": 64, "tiny_vit_5m_224": 224,
    "inception_next_tiny": 64, "swin_tiny_patch4_window7_224": 224,
}
TV_FAST = {"resnet18": 32}
TV_SLOW = {"resnet50": 32, "resnext50_32x4d": 32, "mobilenet_v2": 32, "mobilenet_v3_small": 32,
           "efficientnet_b0": 32, "regnet_x_400mf": 32, "regnet_y_400mf": 32, "mnasnet0_5": 32,
           "convnext_tiny": 32, "swin_t": 64, "vit_b_16": None}

_S = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
          vocab_size=128, max_position_embeddings=64)
_DEC = dict(_S, num_key_value_heads=2)
_G = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, activation_function="gelu")
HF_FAST = {"gpt2": _G, "bert": dict(_S, hidden_act="gelu"), "gpt_neox": dict(_S, hidden_act="gelu")}
HF_SLOW = {
    "llama": _DEC, "t5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=128),
    "vit": dict(_S, image_size=32, patch_size=8),
    "gptj": dict(_G, rotary_dim=4), "codegen": dict(_G, rotary_dim=4),
    "gpt_neo": dict(hidden_size=32, num_layers=2, num_heads=4, vocab_size=128, max_position_embeddings=64,
                    attention_types=[[["global", "local"], 1]], window_size=8, activation_function="gelu"),
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=128,
                max_position_embeddings=64, word_embed_proj_dim=32),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=128),
    "phi": dict(_S, hidden_act="gelu"), "falcon": dict(hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, vocab_size=128),
    "mistral": _DEC, "qwen2": _DEC, "gemma": dict(_DEC, head_dim=8, hidden_activation="gelu"),
    "olmo": _DEC, "starcoder2": dict(_DEC, hidden_act="gelu"), "biogpt": dict(_S, hidden_act="gelu"),
    "xglm": dict(d_model=32, num_layers=2, attention_heads=4, ffn_dim=64, vocab_size=128,
                 max_position_embeddings=64, activation_function="gelu"),
    "roberta": dict(_S, hidden_act="gelu"), "electra": dict(_S, embedding_size=32, hidden_act="gelu"),
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=128,
                       max_position_embeddings=64),
    "albert": dict(_S, embedding_size=16, hidden_act="gelu"),
    "deberta-v2": dict(_S, hidden_act="gelu"), "deberta": dict(_S, hidden_act="gelu"),
    "xlm-roberta": dict(_S, hidden_act="gelu"), "megatron-bert": dict(_S, hidden_act="gelu"),
    "roformer": dict(_S, embedding_size=32, hidden_act="gelu"),
    "mobilebert": dict(_S, embedding_size=32, intra_bottleneck_size=32, true_hidden_size=32,
                       num_feedforward_networks=2, hidden_act="gelu"),
    "bart": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128,
                 max_position_embeddings=64, activation_function="gelu"),
    "deit": dict(_S, image_size=32, patch_size=8), "beit": dict(_S, image_size=32, patch_size=8),
    "dinov2": dict(_S, image_size=32, patch_size=8),
    "swin": dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4),
    "convnext": dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32),
}
_VISION = {"vit", "deit", "beit", "dinov2", "swin", "convnext"}


def _cases(fast: dict, slow_: dict) -> list:
    return [pytest.param(n, s, id=n) for n, s in fast.items()] + \
        [pytest.param(n, s, id=n, marks=sweep) for n, s in slow_.items()]


def _timm(name: str, size: int):
    timm = pytest.importorskip("timm")
    try:
        return timm.create_model(name, pretrained=False, num_classes=8, img_size=size)
    except TypeError:
        return timm.create_model(name, pretrained=False, num_classes=8)


@pytest.mark.parametrize("name, size", _cases(TIMM_FAST, TIMM_SLOW))
def test_timm(name, size):
    torch.manual_seed(0)
    model = _timm(name, size)
    check_network(model, (torch.randn(2, 3, size, size),))


@pytest.mark.parametrize("name, size", _cases(TV_FAST, TV_SLOW))
def test_torchvision(name, size):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    kw = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64) \
        if name == "vit_b_16" else {}
    model = tv.models.get_model(name, weights=None, num_classes=8, **kw) if not kw else \
        tv.models.VisionTransformer(num_classes=8, **kw)
    check_network(model, (torch.randn(2, 3, size or 32, size or 32),))


def test_a_network_without_residual_additions_is_refused_with_what_it_saw():
    """ShuffleNetV2 splits channels, convolves one half and concatenates: no tensor addition at all."""
    tv = pytest.importorskip("torchvision")
    import gradflow
    from gradflow.errors import GradflowError
    model = tv.models.shufflenet_v2_x0_5(weights=None, num_classes=8).eval()
    with pytest.raises(GradflowError, match=r"no residual unit found in ShuffleNetV2: of its 0 tensor additions"):
        gradflow.units(model, example=(torch.randn(2, 3, 32, 32),), units="run")


def _hf(name: str, cfg: dict):
    T = pytest.importorskip("transformers")
    T.logging.set_verbosity_error()
    config = T.AutoConfig.for_model(name, **cfg)
    model = T.T5EncoderModel(config) if name == "t5" else T.AutoModel.from_config(config)
    if name in _VISION:
        kwargs = dict(pixel_values=torch.randn(2, 3, 32, 32))
    else:
        kwargs = dict(input_ids=torch.randint(0, 128, (2, 8)))
        if name == "bart":
            kwargs["decoder_input_ids"] = torch.randint(0, 128, (2, 8))
    return model, kwargs


def _hidden(out):
    return out.last_hidden_state


@pytest.mark.parametrize("name, cfg", _cases(HF_FAST, HF_SLOW))
def test_hugging_face(name, cfg):
    torch.manual_seed(0)
    model, kwargs = _hf(name, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        check_network(model, kwargs=kwargs, out_of=_hidden)


def test_sweep_is_as_wide_as_promised():
    assert len(TIMM_FAST) + len(TIMM_SLOW) + len(TV_FAST) + len(TV_SLOW) >= 60
    assert len(HF_FAST) + len(HF_SLOW) >= 25


@slow
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.bfloat16, 5e-2)], ids=["float64", "bfloat16"])
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "gpt2"])
def test_other_dtypes(name, dtype, rtol):
    torch.manual_seed(0)
    if name == "gpt2":
        model, kwargs = _hf(name, HF_FAST["gpt2"])
        args, out_of = (), _hidden
    else:
        model, kwargs, args, out_of = _timm(name, 32), {}, (torch.randn(2, 3, 32, 32, dtype=dtype),), (lambda o: o)
    model = model.to(dtype)
    try:
        check_network(model, args, kwargs, out_of=out_of, rtol=rtol)
    except RuntimeError as e:
        if "Double" in str(e) or "BFloat16" in str(e) or "dtype" in str(e):
            pytest.xfail(f"the recorder's reductions do not take {dtype} yet (tracing/stats.py): {e}")
        raise
