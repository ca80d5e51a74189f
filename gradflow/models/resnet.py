"""The CIFAR ResNet built from residual units, and the registered zoo.

Depths follow the paper: basic-block nets have 6n + 2 layers (resnet20 ...
resnet1202), bottleneck nets 9n + 2 (resnet164, resnet1001). The default unit is
full pre-activation built as the official code builds it (docs/theory.md, section 7.2):
a stem conv with no BN-ReLU after it, a shared pre-activation at projection
units, a final BN-ReLU before pooling, He fan-out init, no conv biases.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from gradflow.errors import GradflowError
from gradflow.models.registry import register_model
from gradflow.models.units import PREACT_TYPES, ResidualUnit, UnitSpec, conv3x3, unit_options, unit_spec


class CifarResNet(nn.Module):
    """A ResNet for 32x32 inputs: stem, stages of residual units, head.

    ``model.units()`` lists the residual units in order (input to output); the
    head's input is x_L, the output of the last unit.
    """

    def __init__(self, spec: UnitSpec, units_per_stage: Sequence[int], widths: Sequence[int],
                 strides: Sequence[int] | None = None, stem_width: int = 16,
                 num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if num_classes < 1:
            raise GradflowError(f"num_classes={num_classes!r} must be >= 1 (10 for CIFAR-10, 100 for CIFAR-100)")
        strides = list(strides) if strides is not None else [1] + [2] * (len(widths) - 1)
        self.spec = spec
        stem: list[nn.Module] = [conv3x3(in_channels, stem_width)]
        if spec.unit not in PREACT_TYPES:
            stem += [nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True)]
        elif spec.unit == "relu_only_preact":
            stem += [nn.BatchNorm2d(stem_width)]
        self.stem = nn.Sequential(*stem)
        stages, ch = [], stem_width
        for s, (n, width, stride) in enumerate(zip(units_per_stage, widths, strides)):
            units = [ResidualUnit(spec, ch if i == 0 else width, width, stride if i == 0 else 1, stage=s)
                     for i in range(n)]
            stages.append(nn.Sequential(*units))
            ch = width
        self.stages = nn.Sequential(*stages)
        # The extra activation after the last addition (pre-activation nets only).
        if spec.unit == "full_preact":
            self.head_act = nn.Sequential(nn.BatchNorm2d(ch), nn.ReLU(inplace=True))
        elif spec.unit == "relu_only_preact":
            self.head_act = nn.ReLU()  # not in place: x_L, the last unit's output, stays intact
        else:
            self.head_act = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He fan-out init for convs (N(0, sqrt(2 / (k*k*c_out)))), BN gamma 1 and beta 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                with torch.no_grad():
                    m.weight.normal_(0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for u in self.units():  # the gate's bias b_g survives the conv init
            if hasattr(u.combine, "conv"):
                nn.init.constant_(u.combine.conv.bias, u.spec.gate_bias)

    def units(self) -> list[ResidualUnit]:
        return [u for stage in self.stages for u in stage]

    def forward_features(self, x: Tensor) -> Tensor:  # [B, 3, 32, 32] -> x_L [B, C, 8, 8]
        return self.stages(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:  # [B, 3, H, W] -> logits [B, num_classes]
        x = self.head_act(self.forward_features(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _units_for_depth(depth: int, block: str) -> int:
    per = 6 if block == "basic" else 9
    if depth < per + 2 or (depth - 2) % per:
        ok = "6n+2 (20, 32, 44, 56, 110, 1202)" if block == "basic" else "9n+2 (164, 1001)"
        raise GradflowError(f"depth={depth!r} does not fit {block} blocks: use {ok}")
    return (depth - 2) // per


def scaled_width(channels: int, width: float, multiple: int = 1) -> int:
    """``channels * width`` rounded to the nearest multiple of ``multiple`` (at least one multiple).

    Args:
        channels: the paper's channel count (16, 64, 256 ...).
        width: the channel multiplier; 1.0 keeps the paper's count exactly.
        multiple: the count must stay a multiple of this (4 for bottleneck outputs,
            whose inner width is out/4).
    Returns:
        The scaled channel count.
    """
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0 \
            or not math.isfinite(width):
        raise GradflowError(f"width={width!r} must be a positive number (1.0: the paper's widths; "
                            "0.25: a quarter of the channels)")
    return max(1, round(channels * width / multiple)) * multiple


def cifar_resnet(depth: int, block: str = "basic", num_classes: int = 10, width: float = 1.0,
                 **options) -> CifarResNet:
    """A CIFAR ResNet of any valid depth. Basic nets: widths 16/32/64; bottleneck: 64/128/256.

    ``width`` multiplies every channel count (stem and stages; bottleneck outputs stay a
    multiple of 4 so that the inner width is out/4); 1.0 is the paper's net. ``options``
    are the unit's (:func:`gradflow.models.units.unit_options`: unit, shortcut, scale, ...).
    """
    spec = unit_spec(block, **options)
    n = _units_for_depth(depth, block)
    if block == "basic":
        widths = tuple(scaled_width(c, width) for c in (16, 32, 64))
    else:
        widths = tuple(scaled_width(c, width, 4) for c in (64, 128, 256))
    return CifarResNet(spec, (n, n, n), widths, stem_width=scaled_width(16, width),
                       num_classes=num_classes)


def _zoo_entry(fn):
    """Register a CIFAR ResNet entry point; ``**options`` are the unit's (registry.model_options lists them)."""
    fn.options = unit_options()
    return register_model(fn)


@_zoo_entry
def resnet20(num_classes: int = 10, width: float = 1.0, **options) -> CifarResNet:
    """Basic-block CIFAR ResNet-20: 3 units a stage (the paper's Table 3 and Fig. 6)."""
    return cifar_resnet(20, "basic", num_classes, width, **options)


@_zoo_entry
def resnet32(num_classes: int = 10, width: float = 1.0, **options) -> CifarResNet:
    """Basic-block CIFAR ResNet-32: 5 units a stage."""
    return cifar_resnet(32, "basic", num_classes, width, **options)


@_zoo_entry
def resnet44(num_classes: int = 10, width: float = 1.0, **options) -> CifarResNet:
    """Basic-block CIFAR ResNet-44: 7 units a stage."""
    return cifar_resnet(44, "basic", num_classes, width, **options)


@_zoo_entry
def resnet56(num_classes: int = 10, width: float = 1.0, **options) -> CifarResNet:
    """Basic-block CIFAR ResNet-56: 9 units a stage."""
    return cifar_resnet(56, "basic", num_classes, width, **options)


@_zoo_entry
def resnet110(num_classes: int = 10, width: float = 1.0, **options) -> CifarResNet:
    """Basic-block CIFAR ResNet-110: 18 units a stage (the paper's Tables 1 and 2)."""
    return cifar_resnet(110, "basic", num_classes, width, **options)


@_zoo_entry
def resnet1202(num_classes: int = 10, width: float = 1.0, **options) -> CifarResNet:
    """Basic-block CIFAR ResNet-1202: 200 units a stage."""
    return cifar_resnet(1202, "basic", num_classes, width, **options)


@_zoo_entry
def resnet164(num_classes: int = 10, width: float = 1.0, **options) -> CifarResNet:
    """Bottleneck CIFAR ResNet-164: 18 units a stage (the paper's Tables 2 and 3)."""
    return cifar_resnet(164, "bottleneck", num_classes, width, **options)


@_zoo_entry
def resnet1001(num_classes: int = 10, width: float = 1.0, **options) -> CifarResNet:
    """Bottleneck CIFAR ResNet-1001: 111 units a stage (the paper's Fig. 1 and Table 3)."""
    return cifar_resnet(1001, "bottleneck", num_classes, width, **options)


def preact_resnet18(num_classes: int = 10, width: float = 1.0, **options) -> CifarResNet:
    """The seed's 4-stage PreActResNet-18 for 32x32 input: widths 64-512 (times ``width``), 2 units a stage."""
    spec = unit_spec("basic", **options)
    return CifarResNet(spec, (2, 2, 2, 2), tuple(scaled_width(c, width) for c in (64, 128, 256, 512)),
                       (1, 2, 2, 2), stem_width=scaled_width(64, width), num_classes=num_classes)


preact_resnet18 = _zoo_entry(preact_resnet18)
