"""Checkpoints: written atomically, loaded back into a model with one call.

A checkpoint is a dict saved by ``torch.save``:

- ``format``: "gradflow-checkpoint/1"
- ``model`` and ``options``: the registered name and the ``create_model`` keywords,
  so ``gradflow.create_model(model, **options)`` rebuilds the architecture
- ``model_state``: the eager model's state dict (no DDP / compile prefixes)
- ``optimizer``, ``step`` (iterations done), ``epoch``, ``rng`` (torch CPU and CUDA
  states), ``log_acc`` (the partial log interval), ``config`` (the resolved TrainConfig)

The data order needs no state of its own: it is a function of (seed, epoch) and
the step (see gradflow.data).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import GradflowError
from ..io import atomic_write
from ..registry import create_model

FORMAT = "gradflow-checkpoint/1"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then os.replace.

    A reader sees either the previous checkpoint or the new one, never half a file.
    """
    return atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f), fsync=True)


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict. ``path`` may be a run folder (its checkpoint.pt is read)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise GradflowError(f"no checkpoint at {path}: pass a run folder or its checkpoint.pt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001  (torch.load fails in many ways on a bad file)
        raise GradflowError(f"cannot read checkpoint {path} ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise GradflowError(f"{path} is not a gradflow checkpoint (expected format {FORMAT!r})")
    return ckpt


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model from a checkpoint: ``model, info = gradflow.load_checkpoint(run)``.

    ``path`` is a checkpoint file or a run folder. The model is rebuilt with
    ``gradflow.create_model(info["model"], **info["options"])``, gets the saved
    weights and is returned in eval mode on ``map_location``. ``info`` holds the
    rest (step, epoch, config, ...), without the weights and optimiser state.
    """
    ckpt = read_checkpoint(path, map_location)
    model = create_model(ckpt["model"], **ckpt["options"])
    model.load_state_dict(ckpt["model_state"])
    model.to(map_location if map_location is not None else "cpu").eval()
    info = {k: v for k, v in ckpt.items() if k not in ("model_state", "optimizer")}
    return model, info


def rng_state() -> dict[str, Any]:
    """Torch's CPU and CUDA generator states (dropout shortcuts draw from them)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
