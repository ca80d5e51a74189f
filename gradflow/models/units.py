"""The residual unit and its parts: every variant of Tables 1 and 2 of the paper.

Unit types (Table 2, paper Fig. 4; docs/theory.md, section 7.1):

==========================  ======================================  ==============
``unit``                    residual branch F                       after-addition f
==========================  ======================================  ==============
``original``                conv-BN-ReLU-conv-BN                    ReLU
``bn_after_addition``       conv-BN-ReLU-conv                       BN-ReLU
``relu_before_addition``    conv-BN-ReLU-conv-BN-ReLU               identity
``relu_only_preact``        ReLU-conv-BN-ReLU-conv-BN               identity
``full_preact``             BN-ReLU-conv-BN-ReLU-conv               identity
==========================  ======================================  ==============

For the pre-activation types the leading activation is the unit's ``preact``
part; at a projection unit it is shared by the branch and the shortcut, as the
official code does (docs/theory.md, section 7.2).

Shortcut types (Table 1): ``identity``; ``scale`` (lambda on h, and 1 - lambda
on F with ``scale_branch=True``); ``exclusive_gate`` (1 - g(x) on h, g(x) on F);
``shortcut_gate`` (1 - g(x) on h); ``conv`` (1x1 conv on every unit);
``dropout`` (dropout with ratio p on h). g(x) = sigmoid(W_g x + b_g), W_g a 1x1
conv, b_g = ``gate_bias``. Where a unit changes shape, h first downsamples:
``projection`` (1x1 conv with stride, option B) or ``pad`` (strided identity
with zero channels, option A).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gradflow.errors import GradflowError
from gradflow.tracing.parts import Parts, as_fn, run_parts

UNIT_TYPES = ("original", "bn_after_addition", "relu_before_addition",
              "relu_only_preact", "full_preact")
SHORTCUT_TYPES = ("identity", "scale", "exclusive_gate", "shortcut_gate", "conv", "dropout")
DOWNSAMPLE_TYPES = ("projection", "pad")
PREACT_TYPES = ("relu_only_preact", "full_preact")


def applies_with(default: Any, **needs: tuple) -> Any:
    """A config field that only has an effect when other fields take one of the given values.

    ``scale: float = applies_with(0.5, shortcut=("scale",))``: lambda is read by
    constant-scaling shortcuts only. :func:`inapplicable` reads the rule, so
    option checks derive from the config instead of a hand list.
    """
    return field(default=default, metadata={"needs": needs})


def inapplicable(options: dict, defaults: dict, specs: tuple = ()) -> list[tuple[str, dict]]:
    """The given options that have no effect: (name, {field: values it needs}) per such option.

    Args:
        options: the options given (create_model keywords).
        defaults: the model's defaults for the options not given.
        specs: the config dataclasses whose fields declare rules (default: :class:`UnitSpec`).
    """
    merged = {**defaults, **options}
    out, seen = [], set()
    for spec in specs or (UnitSpec,):
        for f in fields(spec):
            need = f.metadata.get("needs")
            if not need or f.name not in options or f.name in seen:
                continue
            seen.add(f.name)
            unmet = {k: v for k, v in need.items() if merged.get(k) not in v}
            if unmet:
                out.append((f.name, unmet))
    return out


@dataclass(frozen=True)
class UnitSpec:
    """What a unit is, in the paper's terms. Theory reads this; nothing else does."""

    unit: str = "full_preact"
    shortcut: str = "identity"
    block: str = "basic"            # "basic" (two 3x3) or "bottleneck" (1x1, 3x3, 1x1)
    scale: float = applies_with(0.5, shortcut=("scale",))            # lambda
    scale_branch: bool = applies_with(False, shortcut=("scale",))    # also F x (1 - lambda) (Table 1 0.5/0.5)
    gate_bias: float = applies_with(-6.0, shortcut=("exclusive_gate", "shortcut_gate"))  # b_g (paper: -6)
    dropout: float = applies_with(0.5, shortcut=("dropout",))        # the drop ratio p
    downsample: str = "projection"  # how h changes shape: "projection" or "pad"

    def __post_init__(self) -> None:
        _check_choice("unit", self.unit, UNIT_TYPES)
        _check_choice("shortcut", self.shortcut, SHORTCUT_TYPES)
        _check_choice("block", self.block, ("basic", "bottleneck"))
        _check_choice("downsample", self.downsample, DOWNSAMPLE_TYPES)
        if not 0.0 <= self.dropout < 1.0:
            raise GradflowError(f"dropout={self.dropout!r} must be in [0, 1); the paper uses 0.5")
        if self.scale < 0:
            raise GradflowError(f"scale={self.scale!r} must be >= 0 (lambda; the paper uses 0 and 0.5)")

    def as_dict(self) -> dict:
        return asdict(self)


def unit_options(exclude: tuple[str, ...] = ("block",)) -> dict[str, Any]:
    """The unit options a zoo model takes, with their defaults: :class:`UnitSpec`'s fields.

    The one source of the option names: entry points, ``create_model``'s check
    and the CLIs' flags all derive from it (``block`` is fixed by the depth).
    """
    return {f.name: f.default for f in fields(UnitSpec) if f.name not in exclude}


def unit_spec(block: str = "basic", **options: Any) -> UnitSpec:
    """A :class:`UnitSpec` from keyword options; an unknown option names the ones that exist."""
    bad = sorted(set(options) - set(unit_options()))
    if bad:
        raise GradflowError(f"unknown unit option {', '.join(map(repr, bad))}: the options are "
                            f"{', '.join(unit_options())}")
    return UnitSpec(block=block, **options)


def _check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise GradflowError(f"{what}={value!r} is not one of: {', '.join(choices)}")


# --- combine: how h and F are put together ---------------------------------------

class Sum(nn.Module):
    """y = h + F."""

    def forward(self, h: Tensor, r: Tensor, x: Tensor):
        return h + r, 1.0


class ScaledSum(nn.Module):
    """y = lambda h + mu F (Table 1, constant scaling)."""

    def __init__(self, scale: float, branch_scale: float = 1.0):
        super().__init__()
        self.scale, self.branch_scale = float(scale), float(branch_scale)

    def forward(self, h: Tensor, r: Tensor, x: Tensor):
        return self.scale * h + self.branch_scale * r, self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}, branch_scale={self.branch_scale}"


class Gate(nn.Module):
    """y = (1 - g(x)) h + g(x) F (exclusive) or (1 - g(x)) h + F (shortcut-only).

    g(x) = sigmoid(W_g x + b_g), W_g a 1x1 conv (with the unit's stride).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, bias: float, exclusive: bool):
        super().__init__()
        self.exclusive = exclusive
        self.conv = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=True)
        nn.init.constant_(self.conv.bias, bias)

    def forward(self, h: Tensor, r: Tensor, x: Tensor):
        g = torch.sigmoid(self.conv(x))
        c = 1.0 - g
        return c * h + (g * r if self.exclusive else r), c

    def extra_repr(self) -> str:
        return f"exclusive={self.exclusive}"


# --- shortcuts ---------------------------------------------------------------------

class PadShortcut(nn.Module):
    """Option A: strided identity, extra channels zero (the original CIFAR ResNet)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        extra = self.out_ch - self.in_ch
        return F.pad(x, (0, 0, 0, 0, 0, extra)) if extra else x

    def extra_repr(self) -> str:
        return f"{self.in_ch}->{self.out_ch}, stride={self.stride}"


def conv1x1(i: int, o: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(i, o, 1, stride=stride, bias=False)


def conv3x3(i: int, o: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False)


def _shortcut(spec: UnitSpec, in_ch: int, out_ch: int, stride: int) -> nn.Module:
    reshape = stride != 1 or in_ch != out_ch
    if spec.shortcut == "conv":
        return conv1x1(in_ch, out_ch, stride)
    if not reshape:
        down: nn.Module = nn.Identity()
    elif spec.downsample == "pad":
        down = PadShortcut(in_ch, out_ch, stride)
    elif spec.unit in PREACT_TYPES:   # official pre-act code: conv on the pre-activated x
        down = conv1x1(in_ch, out_ch, stride)
    else:                             # post-activation units: conv + BN (option B)
        down = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
    if spec.shortcut == "dropout":
        return nn.Sequential(down, nn.Dropout(spec.dropout)) if reshape else nn.Dropout(spec.dropout)
    return down


def _combine(spec: UnitSpec, in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if spec.shortcut == "scale":
        return ScaledSum(spec.scale, 1.0 - spec.scale if spec.scale_branch else 1.0)
    if spec.shortcut in ("exclusive_gate", "shortcut_gate"):
        return Gate(in_ch, out_ch, stride, spec.gate_bias, spec.shortcut == "exclusive_gate")
    return Sum()


def _branch(spec: UnitSpec, in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    """The residual branch F, without the pre-activation (which is the unit's preact)."""
    if spec.block == "basic":
        convs = [conv3x3(in_ch, out_ch, stride), conv3x3(out_ch, out_ch)]
    else:  # bottleneck: stride on the first 1x1, as the official pre-act code
        mid = out_ch // 4
        convs = [conv1x1(in_ch, mid, stride), conv3x3(mid, mid), conv1x1(mid, out_ch)]
    layers: list[nn.Module] = []
    for i, conv in enumerate(convs):
        last = i == len(convs) - 1
        layers.append(conv)
        if not last:
            layers += [nn.BatchNorm2d(conv.out_channels), nn.ReLU(inplace=True)]
        elif spec.unit in ("original", "relu_before_addition", "relu_only_preact"):
            layers.append(nn.BatchNorm2d(conv.out_channels))
            if spec.unit == "relu_before_addition":
                layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResidualUnit(nn.Module):
    """One residual unit y = combine(h(x), F(x)), x_out = f(y), with named parts.

    Attributes (the same on every variant): ``preact``, ``shortcut`` (h),
    ``branch`` (F), ``combine``, ``post`` (f); ``nn.Identity`` where a part is
    absent. ``spec`` says which variant this is and ``stage`` which stage.
    """

    def __init__(self, spec: UnitSpec, in_ch: int, out_ch: int, stride: int = 1, stage: int = 0):
        super().__init__()
        self.spec, self.stage = spec, stage
        self.in_channels, self.out_channels, self.stride = in_ch, out_ch, stride
        if spec.unit == "full_preact":
            self.preact = nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU())
        elif spec.unit == "relu_only_preact":
            self.preact = nn.ReLU()  # never in place: x also feeds the identity shortcut
        else:
            self.preact = nn.Identity()
        self.shortcut = _shortcut(spec, in_ch, out_ch, stride)
        self.branch = _branch(spec, in_ch, out_ch, stride)
        self.combine = _combine(spec, in_ch, out_ch, stride)
        if spec.unit == "original":
            self.post = nn.ReLU()
        elif spec.unit == "bn_after_addition":
            self.post = nn.Sequential(nn.BatchNorm2d(out_ch), nn.ReLU())
        else:
            self.post = nn.Identity()
        # The official code feeds a projection shortcut the pre-activated tensor.
        projects = isinstance(self.shortcut, nn.Conv2d) or (
            isinstance(self.shortcut, nn.Sequential) and isinstance(self.shortcut[0], nn.Conv2d))
        self.shortcut_preact = spec.unit in PREACT_TYPES and projects and (
            stride != 1 or in_ch != out_ch)

    def parts(self) -> Parts:
        return Parts(branch=self.branch, shortcut=as_fn(self.shortcut), combine=self.combine,
                     post=as_fn(self.post), preact=as_fn(self.preact),
                     shortcut_preact=self.shortcut_preact)

    forward_is_parts = True   # the tracer need not check parts() against this forward

    def forward(self, x: Tensor) -> Tensor:  # [B, in_ch, H, W] -> [B, out_ch, H/s, W/s]
        return run_parts(self.parts(), x)

    def shortcut_scalar(self) -> Optional[float]:
        """The closed-form scalar coefficient of h (1, lambda), or None where data-dependent."""
        if self.spec.shortcut == "identity":
            return 1.0
        if self.spec.shortcut == "scale":
            return self.spec.scale
        return None
