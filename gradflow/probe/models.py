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

from gradflow.errors import GradflowError, first_line, unknown
from gradflow.models.registry import create_model, model_inputs


@dataclass
class BuiltModel:
    """A model ready to probe, with what the report and the config need to say about it."""

    module: nn.Module
    name: str                 # as given, or the checkpoint's registered name
    options: dict             # the create_model options used (the checkpoint's, for a checkpoint)
    image_size: int           # the input size the model expects
    source: str               # "zoo", "torchvision", "timm" or "checkpoint"
    info: Optional[dict] = None  # the checkpoint's info (step, epoch, ...), JSON-safe parts only
    tokens: Optional[dict] = None  # {"vocab_size", "seq_len"} for models that take token ids, else None


def build_model(name: str, options: dict, seed: int, checkpoint: Optional[str] = None,
                image_size: Optional[int] = None) -> BuiltModel:
    """Seed torch, then build ``name`` with ``options`` (or load ``checkpoint``) on the CPU.

    ``image_size`` reaches timm models that take one (ViTs: ``img_size``). For
    ``hf:TYPE`` models the options are fields of the transformers config.
    """
    torch.manual_seed(seed)
    if checkpoint is not None:
        return _from_checkpoint(checkpoint)
    source, _, short = name.partition(":") if ":" in name else ("zoo", "", name)
    if source == "zoo":
        spec = model_inputs(name, **options)
        module = create_model(name, **options)
        if spec["kind"] == "tokens":
            return BuiltModel(module, name, dict(options), 0, "zoo",
                              tokens={"vocab_size": spec["vocab_size"], "seq_len": spec["seq_len"]})
        return BuiltModel(module, name, dict(options), int(spec.get("image_size", 32)), "zoo")
    if source == "hf":
        from gradflow.models.transformer_hf import build_hf
        module, used, tokens = build_hf(short, dict(options))
        return BuiltModel(module, name, used, 0, "hf", tokens=tokens)
    if options:
        raise GradflowError(f"model {name!r} takes no gradflow option {', '.join(map(repr, sorted(options)))}: "
                            "--unit, --shortcut and their parameters apply to gradflow's own models "
                            "(see gradflow.list_models())")
    if source == "torchvision":
        return BuiltModel(_torchvision(short), name, {}, 224, "torchvision")
    if source == "timm":
        module = _timm(short, image_size)
        size = (getattr(module, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1]
        return BuiltModel(module, name, {}, int(image_size or size), "timm")
    raise GradflowError(f"model {name!r}: the prefix {source!r} is not 'torchvision', 'timm' or 'hf'; "
                        "use a registered name (resnet110), torchvision:NAME, timm:NAME or hf:TYPE")


def _torchvision(name: str) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise GradflowError("torchvision:... models need torchvision: pip install torchvision") from None
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise unknown("torchvision model", name, _close_first(name, known))
    return torchvision.models.get_model(name, weights=None)


def _timm(name: str, image_size: Optional[int] = None) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise GradflowError("timm:... models need timm: pip install timm") from None
    if not timm.is_model(name):
        raise unknown("timm model", name, _close_first(name, timm.list_models()))
    if image_size is None:
        return timm.create_model(name, pretrained=False)
    # ViT-like models fix their patch grid at build time (img_size); convolutional ones take any size
    import inspect
    cls = getattr(timm.models.model_entrypoint(name), "__module__", "")
    takes = any("img_size" in inspect.signature(c.__init__).parameters
                for c in _timm_classes(cls))
    try:
        return timm.create_model(name, pretrained=False, **({"img_size": image_size} if takes else {}))
    except Exception as e:  # noqa: BLE001  (timm refuses sizes with assertion/value/type errors)
        raise GradflowError(f"timm:{name} cannot be built for --image-size {image_size}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _timm_classes(module_name: str) -> list:
    """The nn.Module classes defined in a timm model module (where an entry point's model class lives)."""
    import sys
    mod = sys.modules.get(module_name)
    return [v for v in vars(mod).values() if isinstance(v, type) and issubclass(v, nn.Module)
            and v.__module__ == module_name] if mod else []


def _close_first(name: str, known: list[str]) -> list[str]:
    """Long lists (timm has ~1000 names): keep the close matches and those sharing a prefix."""
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    same = [k for k in known if k.split("_")[0] == name.split("_")[0]]
    return sorted(set(close) | set(same[:30])) or known[:40]


def _from_checkpoint(path: str) -> BuiltModel:
    from gradflow.runs.checkpoint import load_checkpoint
    model, info = load_checkpoint(path, map_location="cpu")
    keep = {k: info[k] for k in ("model", "options", "step", "epoch", "format") if k in info}
    return BuiltModel(model, str(info.get("model")), dict(info.get("options") or {}), 32,
                      "checkpoint", keep)



def refuse_input(built: BuiltModel, inputs, device: torch.device, error: BaseException) -> None:
    """After a traced step failed: if a plain forward of one sample fails too, the input is what the model refuses.

    Raises a GradflowError naming the input's shape, the model's own error and the
    size the model was made for; returns (and the caller re-raises ``error``) when the
    plain forward runs, since then the fault is gradflow's.
    """
    x = next(iter(inputs))[0][:1].to(device)
    try:
        with torch.no_grad():
            built.module.to(device)(x)
    except Exception as plain:  # noqa: BLE001  (whatever the model raises on this input)
        what = "token ids" if built.tokens else "images"
        native = _native_size(built)
        hint = (f"pass the --image-size it was made for ({native})" if built.tokens is None and native
                else "pass an input of the size it was made for (--image-size / --seq-len)")
        raise GradflowError(f"{built.name} cannot take {what} of shape {list(x.shape[1:])}: a plain forward "
                            f"fails ({type(plain).__name__}: {first_line(plain)}); {hint}") from error


def _native_size(built: BuiltModel) -> Optional[int]:
    """The image size the model was designed for: timm's pretrained_cfg, torchvision's 224, the zoo's 32."""
    cfg = getattr(built.module, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return int(cfg["input_size"][-1])
    return {"torchvision": 224, "zoo": 32}.get(built.source)
