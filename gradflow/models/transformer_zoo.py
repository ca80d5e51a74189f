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


def _entry(name: str, build: Callable[..., nn.Module], defaults: dict, inputs: Callable[[dict], dict],
           doc: str):
    def fn(**options) -> nn.Module:
        spec, arch = _split({**defaults, **options})
        return build(spec, **arch)
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    fn.options = defaults      # what registry.model_options lists for a **options entry point
    fn.inputs = inputs         # options -> what the model takes (registry.model_inputs)
    return register_model(fn)


def _gpt_inputs(o: dict) -> dict:
    return {"kind": "tokens", "vocab_size": o["vocab_size"], "seq_len": o["seq_len"]}


def _vit_inputs(o: dict) -> dict:
    return {"kind": "image", "channels": o["in_channels"], "image_size": o["image_size"]}


for _name, (_L, _d, _h, _v, _t) in GPT_SIZES.items():
    _entry(_name, GPT, dict(UNIT_OPTIONS, n_layer=_L, d_model=_d, n_head=_h, vocab_size=_v, seq_len=_t,
                            mlp_ratio=4.0, dropout=0.0), _gpt_inputs,
           f"Decoder-only GPT: {_L} blocks (2 units each), {_d} wide, {_h} heads, vocab {_v}, "
           f"sequences up to {_t}; token ids [B, T] in, logits [B, T, vocab] out.")

for _name, (_L, _d, _h, _p) in VIT_SIZES.items():
    _entry(_name, ViT, dict(UNIT_OPTIONS, n_layer=_L, d_model=_d, n_head=_h, patch_size=_p, image_size=32,
                            in_channels=3, num_classes=10, mlp_ratio=4.0, dropout=0.0), _vit_inputs,
           f"ViT for 32x32 images: {_L} blocks (2 units each), {_d} wide, {_h} heads, {_p}x{_p} "
           "patches, mean pooling; images [B, 3, 32, 32] in, logits [B, classes] out.")
