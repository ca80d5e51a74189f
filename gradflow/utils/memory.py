"""Will it fit? A memory estimate made before anything large is allocated, and the one refusal.

``step_estimate(module, shape, device)`` counts parameters and the input, and
where those could come near the free memory counts the activations too: for a
built model, from a real forward of two samples (leaf outputs scale with the
batch; 0.2 s for ResNet-1001 on 2 CPU cores, its buffers, attributes and RNG
streams restored afterwards), and for a model built on the ``meta`` device (the
trainer sizes a model before building it), from a forward on ``meta`` (shapes
only, no storage: ``torch.func.functional_call`` with meta stand-ins for every
parameter and buffer; seconds of host time for a thousand-layer network, since
BatchNorm runs as a Python decomposition there). So a batch of 10,000 images at
2048 px or a ResNet of width x1e6 is sized without a byte of it existing.
The figure is a lower bound of what a training step holds: parameters (and, for
training, their gradients and momentum), the input, and the output of every
leaf module (what autograd keeps for the backward pass). ``check_fits`` compares
it with the memory this process can have (CUDA: free device memory; CPU: the
kernel's MemAvailable and any cgroup limit) and refuses, naming both figures
and the flag that shrinks it, only when even the lower bound does not fit.

A model whose forward cannot run that way (``.item()`` on meta, data-dependent
shapes, custom kernels, a model that needs more than two samples) gets no
activation figure; the estimate then counts parameters and input only and says
so in its ``parts``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn

from gradflow.utils.state import untouched

from gradflow.errors import GradflowError

GIB = 2 ** 30


@dataclass
class Estimate:
    """Bytes a step needs at least, by part (``parameters``, ``input``, ``activations``)."""

    parts: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)   # what could not be counted

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    def describe(self) -> str:
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in self.parts.items())
        return f"at least {_gib(self.total)} ({parts})" + (f"; {'; '.join(self.notes)}" if self.notes else "")


def _gib(n: float) -> str:
    return f"{n / GIB:.3g} GiB" if n >= GIB / 100 else f"{n / 2 ** 20:.3g} MiB"


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory this process may still allocate on ``device``; None where that cannot be read."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            found.append(max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return min(found) if found else None


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
    return math.prod(int(s) for s in shape) * dtype.itemsize


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (meta tensors count by shape)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def activation_bytes(module: nn.Module, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Optional[int]:
    """Bytes of every leaf module's output for one forward at ``shape``; None if it cannot run.

    A module with real parameters runs on two samples where it lives (the sum
    scaled to ``shape[0]``), without changing it (:func:`gradflow.utils.state.untouched`);
    a module on ``meta`` runs there, with meta stand-ins for its parameters and buffers.
    """
    tensors = [*module.parameters(), *module.buffers()]
    on_meta = not tensors or any(t.is_meta for t in tensors)
    total = [0]

    def count(_m, _inp, out):
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                total[0] += t.numel() * t.element_size()

    leaves = [m for m in module.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        if on_meta:
            stand_ins = {k: torch.empty_like(t, device="meta")
                         for k, t in [*module.named_parameters(), *module.named_buffers()]}
            x = torch.empty(tuple(shape), dtype=dtype, device="meta")
            with torch.no_grad():
                torch.func.functional_call(module, stand_ins, (x,), strict=False)
            return total[0]
        dev, few = tensors[0].device, min(int(shape[0]), 2)
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn((few, *shape[1:]), generator=gen, device=dev).to(dtype)
        with untouched(module, dev), torch.no_grad():
            module(x)
        return total[0] * int(shape[0]) // few
    except Exception:  # noqa: BLE001  (a forward that cannot run this way ends the estimate, not the run)
        return None
    finally:
        for h in handles:
            h.remove()


def check_fits(estimate: Estimate, device: torch.device, what: str, fix: str) -> None:
    """Refuse (GradflowError) when ``estimate`` exceeds the memory ``device`` has left.

    Args:
        estimate: the lower bound of what the step needs.
        device: where it would run.
        what: the job in words (``"probing timm:vit_tiny at batch 16, 224x224"``).
        fix: the flags that shrink it (``"pass a smaller --batch-size or --image-size"``).
    """
    free = available_bytes(device)
    if free is not None and estimate.total > free:
        raise GradflowError(f"{what} needs {estimate.describe()}, and {device.type} has "
                            f"{_gib(free)} available: {fix}")


def step_estimate(module: nn.Module, shape: Sequence[int], device: torch.device, training: bool = False,
                  dtype: torch.dtype = torch.float32) -> Estimate:
    """What one forward/backward of ``module`` on a batch of ``shape`` holds at least.

    The activations are counted (:func:`activation_bytes`) only where a generous
    bound says the step might not fit: input x leaf modules x 16 over half the
    memory available (the activations of the zoo's ResNet-1001 are 7 x input x
    leaves). Below that the estimate counts parameters and input.
    """
    params = parameter_bytes(module)
    est = Estimate({"parameters": params * (3 if training else 1), "input": tensor_bytes(shape, dtype)})
    free = available_bytes(device)
    leaves = sum(1 for m in module.modules() if not any(True for _ in m.children()))
    if free is None or est.total > free or est.parts["input"] * leaves * 16 + est.total <= free / 2:
        return est
    acts = activation_bytes(module, shape, dtype)
    if acts is None:
        est.notes.append("activations not counted (the model's forward did not run on a sample of two, "
                         "or on the meta device)")
    else:
        est.parts["activations"] = acts
    return est
