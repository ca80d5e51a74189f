"""gradflow: how signals and gradients travel through the depth of residual networks.

Built around He et al. 2016, "Identity Mappings in Deep Residual Networks".

``import gradflow`` costs little more than ``import torch``: the registry and the
model zoo load at once (they need only ``torch.nn``); everything that needs
pandas, scipy or matplotlib (``trace``, ``theory``, ``plot``, ``training``,
``probe``, ``runs``) is imported on first use, e.g. ``gradflow.trace`` or
``gradflow.plot``. ``benchmarks/import_bench.py`` measures it.
"""
from __future__ import annotations

import importlib

from gradflow.errors import GradflowError
from gradflow.models.registry import create_model, list_models, model_inputs, model_options, register_model
from gradflow import models  # noqa: F401  (registers the zoo: the registry itself never imports the models)

__version__ = "0.1.0"

# name -> (module, attribute): imported on first access (PEP 562)
_LAZY = {"trace": ("tracing", "trace"), "Tracer": ("tracing", "Tracer"), "find_units": ("tracing", "find_units"),
         "units": ("tracing", "units"),
         "load_checkpoint": ("runs.checkpoint", "load_checkpoint"), "train": ("training", "train")}
_SUBMODULES = ("cli", "data", "experiments", "integrations", "plot", "probe", "runs", "theory", "tracing",
               "training", "utils")

__all__ = ["create_model", "list_models", "model_inputs", "model_options", "register_model", "GradflowError",
           "trace", "Tracer", "find_units", "units", "__version__"]
__all__ += ["load_checkpoint", "train"]


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'gradflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
