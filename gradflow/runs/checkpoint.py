"""Checkpoints: the format, its digest check, ``load_checkpoint`` and the trainer's atomic ``save_checkpoint``.

This module sits below the trainer, so the probe, the lesion study and the figures
read a trained run without importing ``gradflow.training``.

A checkpoint is a dict saved by ``torch.save``:

- ``format``: "gradflow-checkpoint/1"
- ``model`` and ``options``: the registered name and the ``create_model`` keywords,
  so ``gradflow.create_model(model, **options)`` rebuilds the architecture
- ``model_state``: the eager model's state dict (no DDP / compile prefixes)
- ``optimizer``, ``step`` (iterations done), ``epoch``, ``rng`` (torch CPU and CUDA
  states), ``log_acc`` (the partial log interval), ``config`` (the resolved TrainConfig)
- ``wall_time`` (seconds trained so far), ``log_rows`` / ``probe_rows`` (how many rows
  of log.jsonl / probe.csv this state vouches for: resume keeps exactly those)
- ``sha256``: a digest of everything above (every tensor's bytes, dtype and shape,
  every other value's repr), checked on load: a flipped byte is refused

Only tensors and plain data (dict, list, str, numbers) are stored, so the file is
read with ``torch.load(weights_only=True)``: a crafted checkpoint cannot run code.

The data order needs no state of its own: it is a function of (seed, epoch) and
the step (see gradflow.data.cifar).
"""
from __future__ import annotations

import hashlib
import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gradflow.errors import GradflowError
from gradflow.utils.io import atomic_write
from gradflow.models.registry import create_model

FORMAT = "gradflow-checkpoint/1"

__all__ = ["FORMAT", "digest", "misfit", "read_checkpoint", "load_checkpoint"]


def digest(payload: dict[str, Any]) -> str:
    """SHA-256 over a checkpoint's content (its ``sha256`` entry left out), independent of pickling.

    Tensors contribute dtype, shape and raw bytes; dicts their items in key order;
    lists and tuples their items; everything else its type and repr.
    """
    h = hashlib.sha256()

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            h.update(b"D%d" % len(obj))
            for k in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
                if k == "sha256" and obj is payload:
                    continue
                h.update(repr(k).encode())
                walk(obj[k])
        elif isinstance(obj, (list, tuple)):
            h.update(b"L%d" % len(obj))
            for v in obj:
                walk(v)
        else:
            h.update(f"{type(obj).__name__}:{obj!r};".encode())

    walk(payload)
    return h.hexdigest()


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict. ``path`` may be a run folder (its checkpoint.pt is read)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise GradflowError(f"no checkpoint at {path}: pass a run folder or its checkpoint.pt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # not an object it refused to build: a damaged or foreign file
            raise GradflowError(f"cannot read checkpoint {path} (UnpicklingError: {_first_reason(e)}): "
                                "the file is damaged or not a checkpoint") from None
        raise GradflowError(
            f"refused to load {path}: it holds objects other than tensors and plain data "
            f"({_first_reason(e)}), and loading those could run code. gradflow checkpoints never hold "
            "them: the file was written by something else or crafted; do not use it") from None
    except Exception as e:  # noqa: BLE001  (torch.load fails in many ways on a bad file)
        raise GradflowError(f"cannot read checkpoint {path} ({type(e).__name__}: {_first_reason(e)}): "
                            "the file is damaged or not a checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise GradflowError(f"{path} is not a gradflow checkpoint (expected format {FORMAT!r})")
    saved = ckpt.pop("sha256", None)
    if saved is None:
        warnings.warn(f"checkpoint {path} carries no digest (written before gradflow checked them): "
                      "it is loaded unchecked", stacklevel=2)
    elif digest(ckpt) != saved:
        raise GradflowError(f"checkpoint {path} is damaged: its content does not match the SHA-256 digest "
                            "saved with it (a changed byte in a tensor or a value). Resume from an "
                            "earlier copy or start the run again")
    return ckpt


def _first_reason(e: BaseException) -> str:
    """The informative line of torch.load's long messages ("Unsupported global: GLOBAL os.system ...")."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "Unsupported" in ln or "GLOBAL" in ln:
            return ln.split(" was not an allowed global")[0].split(". ")[0][:200]
    return (lines[0] if lines else type(e).__name__)[:200]


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model from a checkpoint: ``model, info = gradflow.load_checkpoint(run)``.

    ``path`` is a checkpoint file or a run folder. The model is rebuilt with
    ``gradflow.create_model(info["model"], **info["options"])``, gets the saved
    weights and is returned in eval mode on ``map_location``. ``info`` holds the
    rest (step, epoch, config, ...), without the weights and optimiser state.

    Args:
        path: a ``checkpoint.pt`` or the run folder holding one.
        map_location: the device to load onto.
    Returns:
        ``(model, info)``.
    Raises:
        GradflowError: no checkpoint there, or one that is damaged (its SHA-256 digest
            does not match) or not a gradflow checkpoint. The file is read with
            ``torch.load(weights_only=True)``: it never runs code.
    """
    ckpt = read_checkpoint(path, map_location)
    try:
        model = create_model(ckpt["model"], **ckpt["options"])
        model.load_state_dict(ckpt["model_state"])
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, GradflowError) as e:
        raise GradflowError(misfit(path, e)) from None
    model.to(map_location if map_location is not None else "cpu").eval()
    info = {k: v for k, v in ckpt.items() if k not in ("model_state", "optimizer")}
    return model, info

def misfit(path: str | Path, e: BaseException) -> str:
    """The one message for a checkpoint whose digest holds but whose content does not fit its model."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    first = (lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else
             (lines[0] if lines else type(e).__name__))
    return (f"checkpoint {path} does not fit its model: {first[:200]}; it was written for other options or "
            "edited. Pass the run folder it came from, or train again")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then os.replace.

    A reader sees either the previous checkpoint or the new one, never half a file.
    """
    payload = {"format": FORMAT, **state}
    payload["sha256"] = digest(payload)
    # serialise in memory, then write the bytes: a full disk is then an OSError (ENOSPC) from the
    # write itself, not torch's RuntimeError about stream positions
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write(path, lambda f: f.write(buf.getbuffer()), fsync=True)


def rng_state() -> dict[str, Any]:
    """Torch's CPU and CUDA generator states (dropout shortcuts draw from them)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (CUDA only where CUDA is available)."""
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
