"""Trace a model once on a batch: the one function the probe, the figures and the benchmarks call.

``trace_once(model, inputs, seed=...)`` runs one traced forward/backward per
input batch (mean cross-entropy) and returns the tracer. ``trace_at_init(name,
options, seed=..., batch_size=...)`` builds a registered model at ``seed`` and
traces it on the probe's synthetic batch at the same seed, so a figure made at
seed 0 and ``python -m gradflow.probe --seed 0`` trace the same network on the
same images and labels.

The caller's model comes back as it was found: device, train/eval mode of
every submodule, ``requires_grad`` of every parameter, buffers (BN running
statistics, which a train-mode forward updates) and the global RNG state.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gradflow.errors import GradflowError
from gradflow.probe.inputs import Inputs, synthetic
from gradflow.probe.models import build_model


@contextlib.contextmanager
def borrowed(model: nn.Module, device: Optional[torch.device] = None, train: Optional[bool] = None,
             weight_grads: Optional[bool] = None) -> Iterator[nn.Module]:
    """Use ``model`` on ``device``, in train (or eval) mode, with weight gradients on or off; restore it after.

    Args:
        model: the caller's model; changed only inside the block.
        device: where to run (None: where it is).
        train: train mode (True), eval mode (False) or as it is (None).
        weight_grads: set every parameter's ``requires_grad`` (None: as it is).
    Yields:
        The same model object.
    """
    params = list(model.parameters())
    grads = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    places = {t.device for t in [*params, *model.buffers()]}
    home = next(iter(places)) if len(places) == 1 else None
    if device is not None and places and places != {device} and home is None:
        raise GradflowError(f"the model spans devices {sorted(map(str, places))}: gradflow cannot move it "
                            f"to {device} and back; move it yourself and pass device=None")
    saved = {k: b.detach().clone() for k, b in model.named_buffers()}
    forks = [device.index or 0] if device is not None and device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=forks):
            if device is not None and home is not None and home != device:
                model.to(device)
            if train is not None:
                model.train(train)
            if weight_grads is not None:
                for p in params:
                    p.requires_grad_(weight_grads)
            yield model
    finally:
        if home is not None and device is not None and home != device:
            model.to(home)
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in saved:
                    b.copy_(saved[k])
        for m, was in modes:
            m.training = was
        for p, g in zip(params, grads):
            p.requires_grad_(g)


def traced_step(model: nn.Module, x: Tensor, y: Tensor, synthetic_labels: bool) -> Tensor:
    """Forward, mean cross-entropy, backward; returns the loss. Synthetic labels are taken modulo the classes.

    Token models: logits [batch, seq, vocab] against targets [batch, seq] (every position);
    a Hugging Face output's ``.logits`` is used.
    """
    logits = model(x)
    logits = getattr(logits, "logits", logits)      # Hugging Face ModelOutput
    if logits.ndim == 3 and y.ndim == 2:            # token logits against per-position targets
        logits, y = logits.flatten(0, 1), y.flatten()
    if logits.ndim != 2:
        raise GradflowError(f"the model returns logits of shape {tuple(logits.shape)}; the probe "
                            "needs [batch, classes] (a classifier)")
    classes = logits.shape[1]
    if synthetic_labels:
        y = y % classes
    elif int(y.max()) >= classes:
        raise GradflowError(f"the data has labels up to {int(y.max())} but the model has {classes} "
                            "outputs: pass --num-classes 100 for CIFAR-100 (zoo models)")
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return loss.detach()


@dataclass
class Traced:
    """What one ``trace_once`` recorded: the tracer (``units``, ``samples``, ``summary()``) and step times."""

    tracer: object                       # gradflow.tracing.Tracer, detached
    step_s: list = field(default_factory=list)   # seconds per traced batch (synchronised on CUDA)

    @property
    def units(self):
        return self.tracer.units

    @property
    def samples(self):
        return self.tracer.samples


def trace_once(model: nn.Module, inputs: Inputs, seed: int = 0, device: Optional[torch.device] = None,
               train: bool = True, weight_grads: bool = False, **trace_kwargs) -> Traced:
    """One traced forward/backward (mean cross-entropy) per batch of ``inputs``; the model is restored after.

    Args:
        model: any classifier gradflow can trace (logits [batch, classes]).
        inputs: the batches (:func:`synthetic` or :func:`cifar_test`).
        seed: seeds the global RNG for the step (dropout shortcuts draw their masks from it).
        device: where to run (None: where the model is).
        train: BN on batch statistics (True, as in training) or running statistics.
        weight_grads: also compute weight gradients (off: the tracer reads dE/dx only, and
            a backward without them skips one matmul per layer).
        **trace_kwargs: passed to :func:`gradflow.trace` (``units=``, ``parts=``, ``keep=`` ...).
    Returns:
        :class:`Traced`: the tracer and the time of each step.
    """
    from gradflow.tracing import trace
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    steps = []
    with borrowed(model, device, train, weight_grads):
        torch.manual_seed(seed)
        with trace(model, **trace_kwargs) as tr:
            for x, y in inputs:
                # x needs a gradient: with frozen weights the tracer would otherwise make the first unit's
                # input a leaf with a hook on it, and that leaf keeps the tracer (and the model) alive.
                x, y = x.to(device).detach(), y.to(device)
                x.requires_grad_(x.is_floating_point())      # token ids take no gradient
                t0 = time.perf_counter()
                traced_step(model, x, y, synthetic_labels=inputs.dataset is None)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                steps.append(time.perf_counter() - t0)
    return Traced(tr, steps)


def trace_at_init(model: str, options: Optional[dict] = None, seed: int = 0, batch_size: int = 16,
                  batches: int = 1, image_size: Optional[int] = None,
                  device: Optional[torch.device] = None, **trace_kwargs) -> Traced:
    """Build ``model`` at ``seed`` (He init) and trace it once on the probe's synthetic batch at ``seed``.

    The same network, images and labels as ``python -m gradflow.probe --model MODEL --seed SEED
    --batch-size B`` (synthetic input, train mode).

    Args:
        model: a registered name, ``torchvision:NAME`` or ``timm:NAME``.
        options: ``create_model`` options (zoo models).
        seed: the seed of the weights, the batch and the step.
        batch_size, batches: the synthetic input (N(0, 1) images, uniform labels).
        image_size: None: the model's own (32 for the zoo).
        device: where to run (None: CPU).
        **trace_kwargs: passed to :func:`gradflow.trace`; ``quantities`` defaults to
            :class:`gradflow.probe.quantities.Structure` (what eq. (5)/(8) need to know they apply).
    Returns:
        :class:`Traced`.
    """
    from gradflow.probe.quantities import Structure
    trace_kwargs.setdefault("quantities", [Structure()])
    built = build_model(model, dict(options or {}), seed)
    inputs = synthetic(batch_size, batches, image_size or built.image_size, seed)
    return trace_once(built.module, inputs, seed, device, **trace_kwargs)
