"""Parts of third-party residual blocks: torchvision's and timm's ResNets.

Each adapter re-expresses a block's ``forward`` as :class:`~gradflow.parts.Parts`
calling the block's own submodules in the block's own order, so the traced
forward computes the same numbers (the tests check equality) while exposing
h, F and y as separate tensors. Blocks are matched by their class's module and
name, so neither torchvision nor timm is imported unless the model uses them.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch.nn as nn

from ..parts import Parts, as_fn


def out_of_place(act: Optional[nn.Module]) -> Optional[nn.Module]:
    """A copy of an activation that does not write into its input.

    The after-addition activation must leave y = h + F intact, so the direct
    path can be taken through it. Activations have no parameters, so a shallow
    copy with ``inplace=False`` computes the same function.
    """
    if act is None or isinstance(act, nn.Identity):
        return None
    if getattr(act, "inplace", False):
        act = copy.copy(act)
        act.inplace = False
    return act


def _tv_basic(m: nn.Module) -> Parts:
    def branch(x):
        return m.bn2(m.conv2(m.relu(m.bn1(m.conv1(x)))))
    return Parts(branch=branch, shortcut=as_fn(m.downsample), post=out_of_place(m.relu))


def _tv_bottleneck(m: nn.Module) -> Parts:
    def branch(x):
        x = m.relu(m.bn1(m.conv1(x)))
        x = m.relu(m.bn2(m.conv2(x)))
        return m.bn3(m.conv3(x))
    return Parts(branch=branch, shortcut=as_fn(m.downsample), post=out_of_place(m.relu))


def _timm_tail(m: nn.Module, x):
    if getattr(m, "se", None) is not None:
        x = m.se(x)
    if getattr(m, "drop_path", None) is not None:
        x = m.drop_path(x)
    return x


def _timm_basic(m: nn.Module) -> Parts:
    def branch(x):
        x = m.aa(m.act1(m.drop_block(m.bn1(m.conv1(x)))))
        return _timm_tail(m, m.bn2(m.conv2(x)))
    return Parts(branch=branch, shortcut=as_fn(m.downsample), post=out_of_place(m.act2))


def _timm_bottleneck(m: nn.Module) -> Parts:
    def branch(x):
        x = m.act1(m.bn1(m.conv1(x)))
        x = m.aa(m.act2(m.drop_block(m.bn2(m.conv2(x)))))
        return _timm_tail(m, m.bn3(m.conv3(x)))
    return Parts(branch=branch, shortcut=as_fn(m.downsample), post=out_of_place(m.act3))


def _timm_preact_basic(m: nn.Module) -> Parts:
    def branch(z):
        return m.drop_path(m.conv2(m.norm2(m.conv1(z))))
    return Parts(branch=branch, shortcut=as_fn(m.downsample), preact=m.norm1,
                 shortcut_preact=m.downsample is not None)


def _timm_preact_bottleneck(m: nn.Module) -> Parts:
    def branch(z):
        x = m.conv2(m.norm2(m.conv1(z)))
        return m.drop_path(m.conv3(m.norm3(x)))
    return Parts(branch=branch, shortcut=as_fn(m.downsample), preact=m.norm1,
                 shortcut_preact=m.downsample is not None)


def _timm_v2_bottleneck(m: nn.Module) -> Parts:
    def branch(x):
        x = m.norm2(m.conv2(m.norm1(m.conv1(x))))
        return m.drop_path(m.norm3(m.conv3(x)))
    return Parts(branch=branch, shortcut=as_fn(m.downsample), post=out_of_place(m.act3))


# (module of the class, class name) -> parts factory
ADAPTERS: dict[tuple[str, str], Callable[[nn.Module], Parts]] = {
    ("torchvision.models.resnet", "BasicBlock"): _tv_basic,
    ("torchvision.models.resnet", "Bottleneck"): _tv_bottleneck,
    ("timm.models.resnet", "BasicBlock"): _timm_basic,
    ("timm.models.resnet", "Bottleneck"): _timm_bottleneck,
    ("timm.models.resnetv2", "PreActBasic"): _timm_preact_basic,
    ("timm.models.resnetv2", "PreActBottleneck"): _timm_preact_bottleneck,
    ("timm.models.resnetv2", "Bottleneck"): _timm_v2_bottleneck,
}


def adapter_for(module: nn.Module) -> Optional[Callable[[nn.Module], Parts]]:
    """The parts factory for a known third-party block class, else None."""
    cls = type(module)
    return ADAPTERS.get((cls.__module__, cls.__name__))
