"""Run code on a module without changing it: buffers, module attributes and RNG streams come back.

The tracer's checks, the probe's extra quantities and the memory estimate all run a
module's forward once more beside the user's; none of them may leave a trace of it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn


@contextmanager
def untouched(module: nn.Module, device: torch.device):
    """Run code without changing the module's buffers, its modules' attributes or the global RNG streams.

    Only a buffer the code changed is written back: writing bumps its autograd version,
    and an unchanged one (an index table, as timm's attention-bias indices) may already be
    saved for the traced forward's backward, which would then refuse to run. Plain
    attributes come back too (:func:`_attributes`): a cache the extra forward filled
    (timm's eval-mode attention-bias cache) would otherwise hand the user's forward a
    tensor whose graph gradflow has let go of.
    """
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    attributes = _attributes(module)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, v in saved:
                    if not torch.equal(b, v):
                        b.copy_(v)
            _restore(attributes)


_INTERNALS = frozenset(vars(nn.Module()))   # parameters, buffers, submodules, hooks, mode


def _attributes(module: nn.Module) -> list:
    """Each module's own attributes (not nn.Module's bookkeeping), with a shallow copy of containers."""
    out = []
    for m in module.modules():
        own = {k: v for k, v in vars(m).items() if k not in _INTERNALS}
        shallow = {k: (dict(v) if type(v) is dict else list(v) if type(v) is list else None)
                   for k, v in own.items()}
        out.append((m, own, shallow))
    return out


def _restore(attributes: list) -> None:
    """Put back what :func:`_attributes` saw: values, container contents, no attribute added since."""
    for m, own, shallow in attributes:
        d = vars(m)
        for k in [k for k in d if k not in own and k not in _INTERNALS]:
            del d[k]
        for k, v in own.items():
            if d.get(k) is not v:
                d[k] = v
            copy_ = shallow[k]
            if type(v) is dict and (v.keys() != copy_.keys() or any(v[i] is not copy_[i] for i in v)):
                v.clear()
                v.update(copy_)
            elif type(v) is list and (len(v) != len(copy_) or any(a is not b for a, b in zip(v, copy_))):
                v[:] = copy_


def device_generator(device: torch.device) -> torch.Generator:
    """The default generator of ``device`` alone, to seed a per-unit draw.

    ``torch.manual_seed`` also seeds every lazy backend (CUDA, XPU, MTIA), recording a
    stack trace each time: a second per ResNet-1001 probe when called once per unit.
    """
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None
                                             else torch.cuda.current_device()]
    return torch.default_generator
