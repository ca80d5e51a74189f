"""Trainer integrations (optional extras): a PyTorch Lightning callback and a Hugging Face
``Trainer`` callback. Import the one you use; neither library is imported by gradflow itself.

* :mod:`gradflow.integrations.lightning`: ``GradflowCallback`` (``pip install 'gradflow[lightning]'``)
* :mod:`gradflow.integrations.hf`: ``GradflowTrainerCallback`` (``pip install 'gradflow[hf]'``)
"""
from __future__ import annotations

from typing import Any

import torch


def innermost_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside a trainer's wrapper (Lightning's, accelerate's)."""
    seen = 0
    while seen < 8:
        inner = getattr(opt, "_optimizer", None) or getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not opt:
            opt, seen = inner, seen + 1
            continue
        break
    if not isinstance(opt, torch.optim.Optimizer):
        from gradflow.errors import GradflowError
        raise GradflowError(f"cannot find the torch optimizer inside {type(opt).__name__}: "
                            "trace the model yourself with gradflow.trace(model, optimizer=...)")
    return opt
