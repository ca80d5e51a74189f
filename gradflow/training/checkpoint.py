"""Checkpoint writing for the trainer: atomic saves and the RNG state a resume restores.

The format, its digest and the readers (``read_checkpoint``, ``load_checkpoint``) live one
layer down, in :mod:`gradflow.checkpoint`, so that reading a run never imports the trainer;
they are re-exported here.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import FORMAT, digest, load_checkpoint, read_checkpoint
from ..io import atomic_write

__all__ = ["FORMAT", "digest", "read_checkpoint", "load_checkpoint", "save_checkpoint", "rng_state",
           "set_rng_state"]


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
