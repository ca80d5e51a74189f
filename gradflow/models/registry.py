"""Model registry: ``register_model``, ``create_model``, ``list_models``, ``model_inputs``.

One generic model class, many thin named entry points (the timm habit). An entry
point is a function taking keyword options and returning an ``nn.Module``;
``create_model`` checks the options against the entry point's signature so an
unknown option fails with the list of options that exist.
"""
from __future__ import annotations

import fnmatch
import inspect
from typing import Callable, Mapping

import torch.nn as nn

from gradflow.errors import GradflowError, unknown

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn`` under its name. Duplicate names are refused.

    Args:
        fn: an entry point: keyword options in, an ``nn.Module`` out.
    Returns:
        ``fn`` itself, now found by :func:`create_model` and :func:`list_models`.
    """
    name = fn.__name__
    if name in _MODELS:
        raise GradflowError(f"model {name!r} is already registered; pick another name")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted by depth then name.

    Args:
        pattern: a shell-style pattern (``"resnet*"``, ``"gpt-*"``); ``"*"`` lists every model.
    Returns:
        The matching names, e.g. ``["resnet20", "resnet32", ...]``.
    """
    names = [n for n in _MODELS if fnmatch.fnmatch(n, pattern)]
    return sorted(names, key=_sort_key)


def model_options(name: str) -> dict[str, object]:
    """The keyword options a registered model takes, with their defaults.

    Args:
        name: a registered model name.
    Returns:
        ``{option: default}``, e.g. ``{"unit": "full_preact", "shortcut": "identity", ...}``.
    """
    fn = _lookup(name)
    opts = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            opts.update(getattr(fn, "options", {}))
        else:
            opts[p.name] = p.default
    return opts


def model_inputs(name: str, **options) -> dict:
    """What the registered model ``name`` (with ``options``) takes as input.

    ``{"kind": "image", "channels": 3, "image_size": 32}`` for images (the CIFAR
    zoo, which declares nothing), ``{"kind": "tokens", "vocab_size": V,
    "seq_len": T}`` for language models. Entry points declare theirs as a
    ``fn.inputs(options) -> dict`` attribute.
    """
    fn = _lookup(name)
    describe = getattr(fn, "inputs", None)
    if describe is None:
        return {"kind": "image", "channels": 3, "image_size": 32}
    return describe({**model_options(name), **options})


def create_model(name: str, **options) -> nn.Module:
    """Build the registered model ``name`` with keyword ``options``.

    Unknown names raise an error listing close matches; unknown options raise an
    error listing the options the model takes.

    Args:
        name: a registered model name (:func:`list_models`).
        **options: the entry point's keyword options (``unit=``, ``shortcut=``, ``width=``, ...;
            :func:`model_options` lists them).
    Returns:
        The freshly initialised ``nn.Module``.
    Raises:
        GradflowError: an unknown name or option.
    """
    fn = _lookup(name)
    check_options(name, options)
    return fn(**options)


def check_options(name: str, options: Mapping[str, object]) -> dict[str, object]:
    """Refuse option names the registered model ``name`` does not take (as :func:`create_model` does).

    Args:
        name: a registered model name (an unknown one is an error listing close matches).
        options: the keyword options meant for ``create_model``.
    Returns:
        ``model_options(name)``: the options it takes, with their defaults.
    """
    allowed = model_options(name)
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise GradflowError(
            f"model {name!r} takes no option {', '.join(map(repr, bad))}; "
            f"its options are: {', '.join(sorted(allowed))}"
        )
    return allowed


def _lookup(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        raise unknown("model", name, _MODELS)
    return _MODELS[name]


def _sort_key(name: str):
    digits = "".join(c for c in name if c.isdigit())
    return (name.rstrip("0123456789_"), int(digits) if digits else 0, name)
