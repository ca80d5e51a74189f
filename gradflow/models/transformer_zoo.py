"""The registered transformers: ``gpt-*`` (token ids in) and ``vit-cifar-*`` (32x32 images in).

Entry points in the timm habit: a dict of defaults per name, every default
overridable by keyword (``create_model("gpt-small", unit="post_ln", n_layer=24)``).
``gradflow.model_inputs(name, **options)`` says what a model takes:
``{"kind": "tokens", "vocab_size": V, "seq_len": T}`` or
``{"kind": "image", "channels": 3, "image_size": 32}``; the built model carries
the same dict as ``model.inputs``.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from gradflow.models.registry import register_model
from gradflow.models.transformer import GPT, ViT, TransformerSpec

# The unit options every transformer takes (TransformerSpec's fields).
UNIT_OPTIONS = dict(unit="pre_ln", shortcut="identity", scale=0.5, scale_branch=False, skip_init=0.0,
                    init="xavier")

GPT_SIZES = {
    # name: (n_layer, d_model, n_head, vocab_size, seq_len); why
    "gpt-tiny": (4, 64, 2, 256, 64),         # tests and notebooks: a step in milliseconds
    "gpt-small": (12, 256, 4, 512, 128),     # a 12-layer, 256-wide GPT (benchmark, probe)
    "gpt-medium": (24, 512, 8, 1024, 256),   # a deeper, wider stack for depth studies
}
VIT_SIZES = {
    # name: (n_layer, d_model, n_head, patch_size)
    "vit-cifar-tiny": (6, 192, 3, 4),        # ViT-Ti width, half depth; 64 patches of 4x4
    "vit-cifar-small": (12, 384, 6, 4),      # ViT-S width and depth on 32x32 images
}


def _split(options: dict) -> tuple[TransformerSpec, dict]:
    spec = TransformerSpec(**{k: options[k] for k in UNIT_OPTIONS})
    return spec, {k: v for k, v in options.items() if k not in UNIT_OPTIONS}


def _described(defaults: dict, inputs: Callable[[dict], dict]):
    """Attach what registry.model_options and model_inputs read to a ``**options`` entry point."""
    def mark(fn):
        fn.options = defaults      # the options it takes, with their defaults
        fn.inputs = inputs         # options -> what the model takes
        return fn
    return mark


def _build(build: Callable[..., nn.Module], defaults: dict, options: dict) -> nn.Module:
    spec, arch = _split({**defaults, **options})
    return build(spec, **arch)


def _gpt_inputs(o: dict) -> dict:
    return {"kind": "tokens", "vocab_size": o["vocab_size"], "seq_len": o["seq_len"]}


def _vit_inputs(o: dict) -> dict:
    return {"kind": "image", "channels": o["in_channels"], "image_size": o["image_size"]}


def _gpt_defaults(size: str) -> dict:
    n_layer, d_model, n_head, vocab_size, seq_len = GPT_SIZES[size]
    return dict(UNIT_OPTIONS, n_layer=n_layer, d_model=d_model, n_head=n_head, vocab_size=vocab_size,
                seq_len=seq_len, mlp_ratio=4.0, dropout=0.0)


def _vit_defaults(size: str) -> dict:
    n_layer, d_model, n_head, patch_size = VIT_SIZES[size]
    return dict(UNIT_OPTIONS, n_layer=n_layer, d_model=d_model, n_head=n_head, patch_size=patch_size,
                image_size=32, in_channels=3, num_classes=10, mlp_ratio=4.0, dropout=0.0)


@register_model(name="gpt-tiny")
@_described(_gpt_defaults("gpt-tiny"), _gpt_inputs)
def gpt_tiny(**options) -> nn.Module:
    """Decoder-only GPT: 4 blocks (2 units each), 64 wide, 2 heads, vocab 256, sequences up to 64;
    token ids [B, T] in, logits [B, T, vocab] out."""
    return _build(GPT, gpt_tiny.options, options)


@register_model(name="gpt-small")
@_described(_gpt_defaults("gpt-small"), _gpt_inputs)
def gpt_small(**options) -> nn.Module:
    """Decoder-only GPT: 12 blocks (2 units each), 256 wide, 4 heads, vocab 512, sequences up to 128;
    token ids [B, T] in, logits [B, T, vocab] out."""
    return _build(GPT, gpt_small.options, options)


@register_model(name="gpt-medium")
@_described(_gpt_defaults("gpt-medium"), _gpt_inputs)
def gpt_medium(**options) -> nn.Module:
    """Decoder-only GPT: 24 blocks (2 units each), 512 wide, 8 heads, vocab 1024, sequences up to 256;
    token ids [B, T] in, logits [B, T, vocab] out."""
    return _build(GPT, gpt_medium.options, options)


@register_model(name="vit-cifar-tiny")
@_described(_vit_defaults("vit-cifar-tiny"), _vit_inputs)
def vit_cifar_tiny(**options) -> nn.Module:
    """ViT for 32x32 images: 6 blocks (2 units each), 192 wide, 3 heads, 4x4 patches, mean pooling;
    images [B, 3, 32, 32] in, logits [B, classes] out."""
    return _build(ViT, vit_cifar_tiny.options, options)


@register_model(name="vit-cifar-small")
@_described(_vit_defaults("vit-cifar-small"), _vit_inputs)
def vit_cifar_small(**options) -> nn.Module:
    """ViT for 32x32 images: 12 blocks (2 units each), 384 wide, 6 heads, 4x4 patches, mean pooling;
    images [B, 3, 32, 32] in, logits [B, classes] out."""
    return _build(ViT, vit_cifar_small.options, options)
