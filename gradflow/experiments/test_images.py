"""Per-image test results of a finished run, for a bootstrap over test images.

The trainer logs one test error per evaluation, not which images were right. A bootstrap over test
images needs the latter, so it is recomputed here from the run's final checkpoint (the trained
weights, eval mode, the trainer's normalisation) and kept beside the run as ``test_correct.npy``
(a bool array, one entry per test image, read back without pickle). Where the recomputed error
differs from the logged one by more than a point (the trainer evaluated in bf16 autocast on a CPU
that has it; this runs in float32) the caller is told.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from gradflow.errors import GradflowError
from gradflow.utils.io import atomic_write

FILE = "test_correct.npy"


def read_correct(folder: Path) -> Optional[np.ndarray]:
    """The cached per-image results of a run folder (None if there are none)."""
    path = Path(folder) / FILE
    if not path.exists():
        return None
    try:
        return np.load(path, allow_pickle=False).astype(bool)
    except (OSError, ValueError):
        return None


def per_image_correct(folder: Path, data: str, verify: bool = False,
                      batch_size: int = 256) -> np.ndarray:
    """Which test images the run's final checkpoint classifies correctly (bool [images]); cached.

    Args:
        folder: a finished run folder with ``checkpoint.pt``.
        data: the CIFAR folder the run trained on.
        verify: check the data's md5 sums.
        batch_size: evaluation batch.
    Returns:
        A bool array in the test set's order.
    """
    folder = Path(folder)
    cached = read_correct(folder)
    if cached is not None:
        return cached
    from gradflow.data.cifar import DeviceCifar, load_cifar
    from gradflow.runs.checkpoint import load_checkpoint
    if not (folder / "checkpoint.pt").exists():
        raise GradflowError(f"{folder} has no checkpoint.pt: per-image test results need the trained weights")
    model, info = load_checkpoint(folder, "cpu")
    cfg = info.get("config") or {}
    if cfg.get("stop") is not None and info.get("step") is not None and int(info["step"]) < int(cfg["stop"]):
        raise GradflowError(f"{folder}'s checkpoint is from iteration {info['step']} of {cfg['stop']}: "
                            "the run has not finished")
    data_ = DeviceCifar(load_cifar(cfg.get("dataset", "cifar10"), data, verify=verify), torch.device("cpu"))
    out = []
    with torch.no_grad():
        for x, y in data_.test_batches(batch_size):
            out.append((model(x).float().argmax(1) == y).numpy())
    correct = np.concatenate(out) if out else np.zeros(0, bool)
    buf = io.BytesIO()
    np.save(buf, correct, allow_pickle=False)
    atomic_write(folder / FILE, lambda f: f.write(buf.getbuffer()))
    return correct
