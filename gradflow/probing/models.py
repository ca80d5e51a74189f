"""From a probe's model name to a built network and its input size.

``resnet1001`` (gradflow's zoo), ``torchvision:resnet50`` or
``timm:resnetv2_50x1_bit`` (built with ``pretrained=False``: nothing is
downloaded), or a gradflow checkpoint. The input size follows the model: 32 for
the zoo (CIFAR), timm's ``pretrained_cfg['input_size']``, 224 for torchvision.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..errors import GradflowError, unknown
from ..registry import create_model


@dataclass
class BuiltModel:
    """A model ready to probe, with what the report and the config need to say about it."""

    module: nn.Module
    name: str                 # as given, or the checkpoint's registered name
    options: dict             # the create_model options used (the checkpoint's, for a checkpoint)
    image_size: int           # the input size the model expects
    source: str               # "zoo", "torchvision", "timm" or "checkpoint"
    info: Optional[dict] = None  # the checkpoint's info (step, epoch, ...), JSON-safe parts only


def build_model(name: str, options: dict, seed: int, checkpoint: Optional[str] = None) -> BuiltModel:
    """Seed torch, then build ``name`` with ``options`` (or load ``checkpoint``) on the CPU."""
    torch.manual_seed(seed)
    if checkpoint is not None:
        return _from_checkpoint(checkpoint)
    source, _, short = name.partition(":") if ":" in name else ("zoo", "", name)
    if source == "zoo":
        return BuiltModel(create_model(name, **options), name, dict(options), 32, "zoo")
    if options:
        raise GradflowError(f"model {name!r} takes no gradflow option {', '.join(map(repr, sorted(options)))}: "
                            "--unit, --shortcut and their parameters apply to gradflow's own models "
                            "(see gradflow.list_models())")
    if source == "torchvision":
        return BuiltModel(_torchvision(short), name, {}, 224, "torchvision")
    if source == "timm":
        module = _timm(short)
        size = (getattr(module, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1]
        return BuiltModel(module, name, {}, int(size), "timm")
    raise GradflowError(f"model {name!r}: the prefix {source!r} is not 'torchvision' or 'timm'; "
                        "use a registered name (resnet110), torchvision:NAME or timm:NAME")


def _torchvision(name: str) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise GradflowError("torchvision:... models need torchvision: pip install torchvision") from None
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise unknown("torchvision model", name, _close_first(name, known))
    return torchvision.models.get_model(name, weights=None)


def _timm(name: str) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise GradflowError("timm:... models need timm: pip install timm") from None
    if not timm.is_model(name):
        raise unknown("timm model", name, _close_first(name, timm.list_models()))
    return timm.create_model(name, pretrained=False)


def _close_first(name: str, known: list[str]) -> list[str]:
    """Long lists (timm has ~1000 names): keep the close matches and those sharing a prefix."""
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    same = [k for k in known if k.split("_")[0] == name.split("_")[0]]
    return sorted(set(close) | set(same[:30])) or known[:40]


def _from_checkpoint(path: str) -> BuiltModel:
    from ..training import load_checkpoint
    model, info = load_checkpoint(path, map_location="cpu")
    keep = {k: info[k] for k in ("model", "options", "step", "epoch", "format") if k in info}
    return BuiltModel(model, str(info.get("model")), dict(info.get("options") or {}), 32,
                      "checkpoint", keep)

