"""The probe's two extra quantities: what each unit is, and its Jacobian gain on a random direction.

* :class:`Structure`: ``f_identity`` (no activation after the addition) and
  ``h_plain`` (no shortcut module: h is x or a scalar multiple of it), from the
  unit's parts; what eq. (5)/(8) and the mean-field law need to know they apply.
* :class:`Gain`: ``gain_sq`` = ||J_l^T u||^2 / ||u||^2 for one Gaussian
  direction u over the unit's whole batch output (J_l: the batch map
  x_l -> x_{l+1} in the traced mode, BN coupling the samples), an unbiased
  estimate of tr(J_l J_l^T) / n_out whose relative spread is about
  sqrt(2 / n_out) (under 1% for a CIFAR feature map of a batch of 16). The
  isotropy prediction multiplies sqrt(gain_sq) along depth
  (:func:`gradflow.theory.total.isotropy_total`). Cost: one vjp per unit
  through the graph the traced forward has just recorded (``Forward.vjp``):
  no second forward, the same BN batch statistics and dropout masks, and no
  buffer or RNG touched.

Units without callable parts, called with extra arguments, or run without
gradients get NaN.
"""
from __future__ import annotations

import zlib

import torch

from gradflow.tracing.quantities import Forward, Quantity


class Structure(Quantity):
    """``f_identity``, ``h_plain``: 1.0 or 0.0 per unit, from its parts."""

    scalars = ("f_identity", "h_plain")

    def forward(self, t: Forward) -> dict:
        if t.parts is None or t.is_top:
            return {}
        return {"f_identity": torch.tensor(float(t.parts.post is None)),
                "h_plain": torch.tensor(float(t.parts.shortcut is None))}


class Gain(Quantity):
    """``gain_sq``: ||J^T u||^2 / ||u||^2 of the unit's batch map, u Gaussian, seeded by the unit's name."""

    scalars = ("gain_sq",)

    def __init__(self, seed: int = 0):
        self.seed = seed

    def forward(self, t: Forward) -> dict:
        if t.parts is None or t.is_top or t.args or t.vjp is None:
            return {}
        out = t.out
        name = getattr(t.info, "name", "")
        gen = torch.Generator(device=out.device)
        gen.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        u = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
        v = t.vjp(u)
        # norms accumulated in float64 without a float64 copy of either tensor
        num = torch.linalg.vector_norm(v, dtype=torch.float64)
        den = torch.linalg.vector_norm(u, dtype=torch.float64)
        return {"gain_sq": (num / den).square().float()}

    def __repr__(self) -> str:
        return f"Gain(seed={self.seed})"


def probe_quantities(seed: int = 0) -> list:
    """The quantities the probe adds to the tracer's standard set."""
    return [Structure(), Gain(seed)]
