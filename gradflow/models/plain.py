"""Plain (non-residual) CIFAR networks of the ResNets' depths: the contrast of the lesion study.

He et al. 2015's plain nets: the same stem, stages, widths and head as the
``original``-unit ResNets, each two-conv block x -> ReLU(BN(conv(ReLU(BN(conv(x))))))
without a shortcut. ``plain20`` ... ``plain110`` have 6n + 2 layers like
``resnet20`` ... ``resnet110``. Veit et al. 2016 delete a layer of VGG to show
that a plain network does not survive a lesion; ``gradflow.experiments.lesion`` deletes a
block (replaces it by the identity) where its input and output shapes agree.

The blocks have no ``parts()``: tracing does not take them for residual units.
"""
from __future__ import annotations

import math

import torch.nn as nn
from torch import Tensor

from gradflow.models.registry import register_model
from gradflow.models.resnet import _units_for_depth, scaled_width
from gradflow.models.units import conv3x3


class PlainBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN-ReLU, no shortcut: [B, in, H, W] -> [B, out, H/s, W/s]."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, stage: int = 0):
        super().__init__()
        self.block_stage = stage
        self.layers = nn.Sequential(conv3x3(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
                                    conv3x3(out_ch, out_ch), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class CifarPlainNet(nn.Module):
    """Stem conv-BN-ReLU, three stages of plain blocks (16/32/64 x width), pool, fc."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        widths = [scaled_width(c, width) for c in (16, 32, 64)]
        stem = scaled_width(16, width)
        self.stem = nn.Sequential(conv3x3(3, stem), nn.BatchNorm2d(stem), nn.ReLU(inplace=True))
        stages, ch = [], stem
        for s, w in enumerate(widths):
            stages.append(nn.Sequential(*[PlainBlock(ch if i == 0 else w, w, (2 if s else 1) if i == 0 else 1, s)
                                          for i in range(blocks_per_stage)]))
            ch = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)
        for m in self.modules():   # He fan-out init, as the ResNets
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))

    def blocks(self) -> list[PlainBlock]:
        """The plain blocks in order (what a lesion deletes)."""
        return [b for stage in self.stages for b in stage]

    def forward(self, x: Tensor) -> Tensor:  # [B, 3, 32, 32] -> logits [B, num_classes]
        x = self.stages(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


def _plain(depth: int, num_classes: int, width: float) -> CifarPlainNet:
    return CifarPlainNet(_units_for_depth(depth, "basic"), num_classes, width)


@register_model
def plain20(num_classes: int = 10, width: float = 1.0) -> CifarPlainNet:
    """Plain (no shortcut) CIFAR network with 20 layers, the contrast to resnet20."""
    return _plain(20, num_classes, width)


@register_model
def plain32(num_classes: int = 10, width: float = 1.0) -> CifarPlainNet:
    """Plain (no shortcut) CIFAR network with 32 layers, the contrast to resnet32."""
    return _plain(32, num_classes, width)


@register_model
def plain44(num_classes: int = 10, width: float = 1.0) -> CifarPlainNet:
    """Plain (no shortcut) CIFAR network with 44 layers, the contrast to resnet44."""
    return _plain(44, num_classes, width)


@register_model
def plain56(num_classes: int = 10, width: float = 1.0) -> CifarPlainNet:
    """Plain (no shortcut) CIFAR network with 56 layers, the contrast to resnet56."""
    return _plain(56, num_classes, width)


@register_model
def plain110(num_classes: int = 10, width: float = 1.0) -> CifarPlainNet:
    """Plain (no shortcut) CIFAR network with 110 layers, the contrast to resnet110."""
    return _plain(110, num_classes, width)
