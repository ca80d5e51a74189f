"""Transformers whose residual units are selectable like Table 2's, for the paper's questions.

Every transformer block is TWO residual units, attention then MLP, each with its
own x_l, parts and split (the paper's unit is one residual addition):

==============  ================================  ===============  ==================
``unit``        unit                              after-addition f  source
==============  ================================  ===============  ==================
``pre_ln``      x + F(LN(x))                      identity          GPT-2, ViT
``post_ln``     LN(x + F(x))                      LN                Vaswani 2017, BERT
``deepnorm``    LN(alpha x + F(x))                LN                Wang et al. 2022
``rezero``      x + a F(x), a = 0 at init         identity          Bachlechner 2020
``skipinit``    x + a F(x), a = ``skip_init``     identity          De & Smith 2020
==============  ================================  ===============  ==================

DeepNorm (decoder- or encoder-only, N blocks): alpha = (2N)^(1/4), and the
weights of ``fc1``, ``fc2``, ``v_proj`` and ``out_proj`` are scaled by
beta = (8N)^(-1/4) after the base init. ReZero and SkipInit branches have no
LayerNorm (as in their papers); their scalar ``a`` sits in ``combine``, so the
coefficient of h stays 1. Like Table 1, ``shortcut="scale"`` puts lambda on h
(and 1 - lambda on F with ``scale_branch=True``); the direct term then carries
prod(lambda) (eq. 8), and for DeepNorm alpha^(L-l) times the LN Jacobians.

Init (``init=``): ``"xavier"`` (default; Xavier-normal linear weights, zero
biases, N(0, 1) token embeddings: the setting of Xiong et al. 2020, whose
Theorem 1 gradflow checks) or ``"gpt2"`` (N(0, 0.02), residual projections
``out_proj``/``fc2`` at 0.02/sqrt(2N), as nanoGPT).

Units follow the zoo's protocol (``parts()``, ``stage``, ``spec``,
``shortcut_scalar()``) and run through :func:`gradflow.tracing.parts.run_parts`, so the
tracer finds and splits them. The whole stack is one stage: x_l keeps its shape.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gradflow.errors import GradflowError
from gradflow.models.units import applies_with
from gradflow.tracing.parts import Parts, as_fn, run_parts

TRANSFORMER_UNITS = ("pre_ln", "post_ln", "deepnorm", "rezero", "skipinit")
TRANSFORMER_SHORTCUTS = ("identity", "scale")
INITS = ("xavier", "gpt2")


@dataclass(frozen=True)
class TransformerSpec:
    """What a transformer's residual units are, in the paper's terms."""

    unit: str = "pre_ln"
    shortcut: str = "identity"
    scale: float = applies_with(0.5, shortcut=("scale",))           # lambda on h
    scale_branch: bool = applies_with(False, shortcut=("scale",))   # also 1 - lambda on F (Table 1's 0.5/0.5)
    skip_init: float = applies_with(0.0, unit=("skipinit",))        # SkipInit's scalar at init (De & Smith:
                                                                    # 0, or below 1/sqrt(depth))
    init: str = "xavier"            # "xavier" (Xiong et al. 2020's setting) or "gpt2" (nanoGPT)

    def __post_init__(self) -> None:
        for what, value, choices in (("unit", self.unit, TRANSFORMER_UNITS),
                                     ("shortcut", self.shortcut, TRANSFORMER_SHORTCUTS),
                                     ("init", self.init, INITS)):
            if value not in choices:
                raise GradflowError(f"{what}={value!r} is not one of: {', '.join(choices)}")
        if self.scale < 0:
            raise GradflowError(f"scale={self.scale!r} must be >= 0 (lambda on the shortcut)")
        if self.unit == "deepnorm" and self.shortcut != "identity":
            raise GradflowError(f"shortcut={self.shortcut!r} with unit='deepnorm': DeepNorm's shortcut "
                                "is already scaled by alpha = (2N)^(1/4); use shortcut='identity'")

    def as_dict(self) -> dict:
        return asdict(self)


def deepnorm_constants(n_layer: int) -> tuple[float, float]:
    """(alpha, beta) of DeepNorm for a decoder- or encoder-only stack of ``n_layer`` blocks."""
    return (2.0 * n_layer) ** 0.25, (8.0 * n_layer) ** -0.25


# --- the two branches ---------------------------------------------------------------------

class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections; causal if asked.

    The mask is built inside (``is_causal``), so the unit takes x alone.
    """

    def __init__(self, d_model: int, n_head: int, causal: bool, dropout: float = 0.0):
        super().__init__()
        if d_model % n_head:
            raise GradflowError(f"d_model={d_model} is not divisible by n_head={n_head}; "
                                "pick n_head among its divisors")
        self.n_head, self.causal, self.dropout = n_head, causal, dropout
        self.q_proj, self.k_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.v_proj, self.out_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, d] -> [B, T, d]
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.drop(self.out_proj(y.transpose(1, 2).reshape(B, T, C)))

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, causal={self.causal}"


class MLP(nn.Module):
    """fc1 -> GELU -> fc2 (-> dropout)."""

    def __init__(self, d_model: int, d_hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d_model, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, d] -> [B, T, d]
        return self.drop(self.fc2(self.act(self.fc1(x))))


# --- combine and the unit ----------------------------------------------------------------

class ScaledResidual(nn.Module):
    """y = lambda h + mu a F: lambda on h (Table 1 or DeepNorm's alpha), mu on F, a learnable.

    ``gain`` is ReZero's / SkipInit's scalar a (a parameter) or None. The
    coefficient of h returned to the tracer is lambda.
    """

    def __init__(self, scale: float = 1.0, branch_scale: float = 1.0, gain: Optional[float] = None):
        super().__init__()
        self.scale, self.branch_scale = float(scale), float(branch_scale)
        self.gain = nn.Parameter(torch.tensor(float(gain))) if gain is not None else None

    def forward(self, h: Tensor, r: Tensor, x: Tensor):
        if self.gain is not None:
            r = self.gain * r
        if self.branch_scale != 1.0:
            r = self.branch_scale * r
        return (h + r if self.scale == 1.0 else self.scale * h + r), self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}, branch_scale={self.branch_scale}, gain={self.gain is not None}"


class TransformerUnit(nn.Module):
    """One residual unit of a transformer block (attention or MLP), with the zoo's named parts.

    ``preact`` (LN for pre-LN), ``shortcut`` (identity), ``branch`` (F: attention
    or MLP), ``combine`` (:class:`ScaledResidual`), ``post`` (f: LN for post-LN
    and DeepNorm); ``spec`` and ``stage`` as on the zoo's CNN units, and the same
    unit protocol (``parts()``, ``stage``, ``shortcut_scalar()``), so the tracer
    finds it by that protocol.
    """

    def __init__(self, spec: TransformerSpec, branch: nn.Module, d_model: int, alpha: float = 1.0,
                 stage: int = 0):
        super().__init__()
        self.spec, self.stage, self.d_model = spec, stage, d_model
        self.preact = nn.LayerNorm(d_model) if spec.unit == "pre_ln" else nn.Identity()
        self.shortcut = nn.Identity()
        self.shortcut_preact = False
        self.branch = branch
        scale = alpha if spec.unit == "deepnorm" else (spec.scale if spec.shortcut == "scale" else 1.0)
        mu = 1.0 - spec.scale if spec.shortcut == "scale" and spec.scale_branch else 1.0
        gain = {"rezero": 0.0, "skipinit": spec.skip_init}.get(spec.unit)
        self.combine = ScaledResidual(scale, mu, gain)
        self.post = nn.LayerNorm(d_model) if spec.unit in ("post_ln", "deepnorm") else nn.Identity()

    def parts(self) -> Parts:
        return Parts(branch=self.branch, shortcut=as_fn(self.shortcut), combine=self.combine,
                     post=as_fn(self.post), preact=as_fn(self.preact), shortcut_preact=False)

    forward_is_parts = True   # the tracer need not check parts() against this forward

    def forward(self, x: Tensor) -> Tensor:  # [B, T, d] -> [B, T, d]
        return run_parts(self.parts(), x)

    def shortcut_scalar(self) -> Optional[float]:
        """The coefficient of h: 1, lambda, or DeepNorm's alpha."""
        return self.combine.scale


class TransformerBlock(nn.Module):
    """Two residual units: ``attn`` (self-attention) then ``mlp``."""

    def __init__(self, spec: TransformerSpec, d_model: int, n_head: int, causal: bool,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, alpha: float = 1.0):
        super().__init__()
        self.attn = TransformerUnit(spec, SelfAttention(d_model, n_head, causal, dropout), d_model, alpha)
        self.mlp = TransformerUnit(spec, MLP(d_model, int(mlp_ratio * d_model), dropout), d_model, alpha)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, d] -> [B, T, d]
        return self.mlp(self.attn(x))


class _Stack(nn.Module):
    """What the GPT and the ViT share: the blocks, the final LN (pre-LN only), the init."""

    def _build_stack(self, spec: TransformerSpec, n_layer: int, d_model: int, n_head: int,
                     causal: bool, mlp_ratio: float, dropout: float) -> None:
        for what, v in (("n_layer", n_layer), ("d_model", d_model), ("n_head", n_head)):
            if int(v) != v or v < 1:
                raise GradflowError(f"{what}={v!r} must be a positive integer")
        if mlp_ratio <= 0:
            raise GradflowError(f"mlp_ratio={mlp_ratio!r} must be > 0 (4 in GPT-2 and ViT)")
        if not 0.0 <= dropout < 1.0:
            raise GradflowError(f"dropout={dropout!r} must be in [0, 1)")
        self.spec, self.n_layer, self.d_model = spec, n_layer, d_model
        self.alpha, self.beta = deepnorm_constants(n_layer) if spec.unit == "deepnorm" else (1.0, 1.0)
        self.blocks = nn.Sequential(*[TransformerBlock(spec, d_model, n_head, causal, mlp_ratio,
                                                       dropout, self.alpha) for _ in range(n_layer)])
        # pre-LN's stream is never normalised inside the stack: the final LN of GPT-2 / ViT
        self.ln_f = nn.LayerNorm(d_model) if spec.unit == "pre_ln" else nn.Identity()

    def units(self) -> list[TransformerUnit]:
        """The residual units in order: attn, mlp of block 0, then block 1, ..."""
        return [u for b in self.blocks for u in (b.attn, b.mlp)]

    def reset_parameters(self) -> None:
        """The init named by ``spec.init``, then DeepNorm's beta on fc1/fc2/v_proj/out_proj."""
        gpt2 = self.spec.init == "gpt2"
        resid_std = 0.02 / math.sqrt(2 * self.n_layer)
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                if gpt2:
                    std = resid_std if name.endswith(("out_proj", "fc2")) else 0.02
                    nn.init.normal_(m.weight, 0.0, std)
                else:
                    nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02 if gpt2 else 1.0)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for u in self.units():
            if u.combine.gain is not None:
                nn.init.constant_(u.combine.gain, 0.0 if u.spec.unit == "rezero" else u.spec.skip_init)
        if self.spec.unit == "deepnorm":
            with torch.no_grad():
                for b in self.blocks:
                    for lin in (b.attn.branch.v_proj, b.attn.branch.out_proj, b.mlp.branch.fc1,
                                b.mlp.branch.fc2):
                        lin.weight.mul_(self.beta)


class GPT(_Stack):
    """A decoder-only transformer: token ids [B, T] in, logits [B, T, vocab] out.

    Learned positional embeddings, causal self-attention inside each attention
    unit, untied head. ``model.inputs`` says what it takes.
    """

    def __init__(self, spec: TransformerSpec, vocab_size: int = 512, seq_len: int = 128, n_layer: int = 12,
                 d_model: int = 256, n_head: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        for what, v in (("vocab_size", vocab_size), ("seq_len", seq_len)):
            if int(v) != v or v < 1:
                raise GradflowError(f"{what}={v!r} must be a positive integer")
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.inputs = {"kind": "tokens", "vocab_size": vocab_size, "seq_len": seq_len}
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self._build_stack(spec, n_layer, d_model, n_head, True, mlp_ratio, dropout)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.reset_parameters()

    def forward_features(self, idx: Tensor) -> Tensor:  # [B, T] int64 -> x_L [B, T, d]
        if idx.dim() != 2 or idx.is_floating_point():
            raise GradflowError(f"{type(self).__name__} takes token ids [batch, seq] of an integer dtype; "
                                f"got {idx.dtype} of shape {tuple(idx.shape)}")
        T = idx.shape[1]
        if T > self.seq_len:
            raise GradflowError(f"sequence length {T} exceeds seq_len={self.seq_len}; build the model "
                                f"with seq_len={T} or feed shorter sequences")
        pos = torch.arange(T, device=idx.device)
        return self.blocks(self.drop(self.tok_emb(idx) + self.pos_emb(pos)))

    def forward(self, idx: Tensor) -> Tensor:  # [B, T] -> logits [B, T, vocab]
        return self.head(self.ln_f(self.forward_features(idx)))


class ViT(_Stack):
    """A vision transformer for small images: patches -> blocks -> mean pool -> classifier.

    Images [B, C, S, S] in, logits [B, num_classes] out; no class token (mean
    pooling), learned positional embeddings.
    """

    def __init__(self, spec: TransformerSpec, image_size: int = 32, patch_size: int = 4,
                 in_channels: int = 3, num_classes: int = 10, n_layer: int = 6, d_model: int = 192,
                 n_head: int = 3, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise GradflowError(f"image_size={image_size} is not a multiple of patch_size={patch_size}; "
                                "for 32x32 images use patch_size 2, 4 or 8")
        if num_classes < 1:
            raise GradflowError(f"num_classes={num_classes!r} must be >= 1 (10 for CIFAR-10, 100 for CIFAR-100)")
        self.image_size, self.num_classes = image_size, num_classes
        self.inputs = {"kind": "image", "channels": in_channels, "image_size": image_size}
        self.patch_embed = nn.Conv2d(in_channels, d_model, patch_size, stride=patch_size)
        self.pos_emb = nn.Parameter(torch.zeros(1, (image_size // patch_size) ** 2, d_model))
        self.drop = nn.Dropout(dropout)
        self._build_stack(spec, n_layer, d_model, n_head, False, mlp_ratio, dropout)
        self.head = nn.Linear(d_model, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.trunc_normal_(self.pos_emb, std=0.02)

    def forward_features(self, x: Tensor) -> Tensor:  # [B, C, S, S] -> x_L [B, patches, d]
        if x.dim() != 4 or x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise GradflowError(f"{type(self).__name__} takes images [batch, channels, {self.image_size}, "
                                f"{self.image_size}]; got shape {tuple(x.shape)} (build it with "
                                "image_size= for another size)")
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.blocks(self.drop(x + self.pos_emb))

    def forward(self, x: Tensor) -> Tensor:  # [B, C, S, S] -> logits [B, num_classes]
        return self.head(self.ln_f(self.forward_features(x)).mean(1))
