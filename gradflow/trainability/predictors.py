"""Candidate predictors of trainability, from one traced step of a network at initialisation.

One step (forward, mean cross-entropy, backward, the tracer attached) per batch gives, per network:

========================  ===========================================================  ===========
predictor                 what it is                                                   worse when
========================  ===========================================================  ===========
``direct_share``          ||direct term|| / ||dE/dx_0|| at the first unit (eq. 5/8)   lower
``total_growth``          |log10 ||dE/dx_0|| / ||dE/dx_L|| |: growth (or decay) of    higher
                          the total gradient from the top to the first unit
``growth_rate``           |slope| of log ||dE/dx_l|| per unit toward the input         higher
                          (exponential law; one intercept per stage); ``growth_law``
                          says whether an exponential or a power law fits better
``gsc``                   log10 of the gradient scale coefficient (Philipp et al.      higher
                          2018): ||dE/dx_0|| ||x_0|| / (||dE/dx_L|| ||x_L||)
``jacobian_distance``     mean over units of ||J_l - I||_F / sqrt(d) (J_l: the unit's  higher
                          Jacobian, d its size), Hutchinson estimate with vjp
``gradient_correlation``  correlation of dE/dx at an input and at the input moved by   lower
                          ``eps`` of its norm (Balduzzi et al. 2017's shattered
                          gradients: ~0 for a shattered net)
``variance_growth``       slope of log Var(x_l) per unit (one intercept per stage)     higher
========================  ===========================================================  ===========

"worse when" is the direction fixed before looking at any outcome: the rank correlations of
:mod:`gradflow.trainability.check` are oriented by it, so a positive correlation means the
predictor ranks the variants the way it claims to, and the direction is never chosen after the
fact. The batch holds pairs (an input and its moved copy, with the same label), so the correlation
comes from the same traced step as the rest.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch import Tensor

from gradflow.tracing.quantities import Quantity

EPS = 1e-3        # the moved input: x + EPS * ||x|| * d / ||d|| (d random): nearby enough that an
                  # unshattered net keeps its gradient (ResNet-110 at init: corr 0.7; at 1e-2, 0.1)


@dataclass(frozen=True)
class Predictor:
    name: str
    sign: int          # +1: a higher value predicts a higher error; -1: a lower one
    about: str


PREDICTORS = (
    Predictor("direct_share", -1, "share of ||dE/dx_0|| carried by the direct term at the first unit"),
    Predictor("total_growth", +1, "|log10 ||dE/dx_0|| / ||dE/dx_L|| |, total gradient growth to the input"),
    Predictor("growth_rate", +1, "|fitted exponential rate of log ||dE/dx_l|| per unit|"),
    Predictor("gsc", +1, "log10 gradient scale coefficient ||dE/dx_0|| ||x_0|| / (||dE/dx_L|| ||x_L||)"),
    Predictor("jacobian_distance", +1, "mean ||J_l - I||_F / sqrt(d) over units"),
    Predictor("gradient_correlation", -1, f"corr(dE/dx(x), dE/dx(x + {EPS:g}||x||d)), shattered gradients"),
    Predictor("variance_growth", +1, "slope of log Var(x_l) per unit"),
)
BY_NAME = {p.name: p for p in PREDICTORS}


class IdentityDistance(Quantity):
    """``jac_dist_identity``: ||J - I||_F / sqrt(d) of a unit's map x_l -> x_{l+1} at its input.

    Hutchinson: E_v ||(J^T - I) v||^2 = ||J - I||_F^2 for v ~ N(0, I), one vjp per probe vector,
    the unit re-run from its parts on a copy of its input (the whole-batch map, as the unit computes
    it: BN couples samples) with its buffers and the RNG restored after. NaN where the unit changes
    the shape (a stage's first unit: J is not square) or has no callable parts.
    """

    scalars = ("jac_dist_identity",)

    def __init__(self, probes: int = 1, seed: int = 0):
        self.probes, self.seed = probes, seed

    def before(self, t) -> dict:
        if t.is_top:
            return {}
        nan = {"jac_dist_identity": torch.tensor(float("nan"))}
        if t.parts is None or t.args:
            return nan
        from gradflow.utils.state import untouched
        from gradflow.tracing.parts import run_parts
        x = t.x.detach().float()
        gen = torch.Generator(device=x.device)
        gen.manual_seed(self.seed)
        with untouched(t.module, x.device), torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            xi = x.clone().requires_grad_()
            out = run_parts(t.parts, xi)
            if out.shape != xi.shape:
                return nan
            acc = 0.0
            for k in range(self.probes):
                v = torch.randn(out.shape, generator=gen, device=x.device)
                (w,) = torch.autograd.grad(out, xi, v, retain_graph=k < self.probes - 1)
                acc += float((w - v).square().sum() / v.square().sum())
        return {"jac_dist_identity": torch.tensor(math.sqrt(acc / self.probes))}


def paired_batch(x: Tensor, y: Tensor, eps: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """[x; x + eps ||x|| d / ||d||] with labels [y; y]: each input beside its moved copy."""
    d = torch.randn(x.shape, generator=gen)
    scale = eps * x.flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
    moved = x + d * scale.view(-1, *([1] * (x.ndim - 1)))
    return torch.cat([x, moved]), torch.cat([y, y])


def gradient_correlation(grad: Tensor) -> float:
    """Mean Pearson correlation of dE/dx between the first and the second half of a paired batch."""
    g = grad.detach().flatten(1).double()
    a, b = g[: len(g) // 2], g[len(g) // 2:]
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    ok = den > 0
    return float(((a * b).sum(1)[ok] / den[ok]).mean()) if bool(ok.any()) else float("nan")


def from_units(units: pd.DataFrame) -> dict:
    """Every predictor but the gradient correlation, from one step's units table."""
    from gradflow.theory.fits import fit_slope, shape_groups, variance_growth
    body = units[~units["is_top"]].sort_values("unit")
    top = units[units["is_top"]]
    first = body.iloc[0]
    out = {"direct_share": float(first["direct_norm"] / first["grad_norm"]) if first["grad_norm"] > 0 else float("nan")}
    ratio = float(first["grad_ratio"])
    out["total_growth"] = abs(math.log10(ratio)) if ratio > 0 else float("inf")
    ok = body[np.isfinite(body["grad_ratio"]) & (body["grad_ratio"] > 0)]
    depth = (body["unit"].max() + 1 - ok["unit"]).to_numpy(float)    # units between x_l and x_L
    logg = np.log(ok["grad_ratio"].to_numpy(float))
    groups = shape_groups(ok)
    exp_fit = fit_slope(depth, logg, groups)
    pow_fit = fit_slope(np.log(depth), logg, groups)
    out["growth_rate"] = abs(exp_fit.slope)
    out["growth_law"] = ("exponential" if exp_fit.r2 >= pow_fit.r2 else "power")
    out["growth_r2_exponential"], out["growth_r2_power"] = exp_fit.r2, pow_fit.r2
    x_top = float(top["x_norm"].iloc[0]) if len(top) else float("nan")
    gsc = ratio * float(first["x_norm"]) / x_top
    out["gsc"] = math.log10(gsc) if gsc > 0 else float("-inf")
    jd = body["jac_dist_identity"].to_numpy(float) if "jac_dist_identity" in body else np.array([])
    out["jacobian_distance"] = float(np.nanmean(jd)) if np.isfinite(jd).any() else float("nan")
    out["variance_growth"] = float(variance_growth(body)["log"]["slope"])
    return out


def measure(model: nn.Module, batches: list[tuple[Tensor, Tensor]], seed: int = 0, eps: float = EPS,
            probes: int = 1, device: Optional[torch.device] = None) -> dict:
    """Every predictor of ``model`` (at its current weights), averaged over ``batches``.

    Args:
        model: a classifier the tracer can split (the zoo's units, or any with declared parts).
        batches: (images, labels) batches; each becomes a paired batch of twice its size.
        seed: the step's RNG (dropout masks) and the moved inputs' directions.
        eps: how far the moved input is, as a fraction of the input's norm.
        probes: Hutchinson vectors per unit for the Jacobian distance.
        device: where to run (None: where the model is).
    Returns:
        {predictor: value averaged over batches, "growth_law": the law most batches fit better,
        "seconds": wall time}.
    """
    from gradflow.probe.step import borrowed, traced_step
    from gradflow.tracing import trace
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    rows, t0 = [], time.perf_counter()
    with borrowed(model, device, train=True, weight_grads=False):
        torch.manual_seed(seed)
        for x, y in batches:
            xb, yb = paired_batch(x.float(), y, eps, gen)
            xb, yb = xb.to(device).requires_grad_(), yb.to(device)
            with trace(model, quantities=[IdentityDistance(probes, seed)]) as tr:
                traced_step(model, xb, yb, synthetic_labels=True)
                units = tr.units
            row = from_units(units)
            row["gradient_correlation"] = gradient_correlation(xb.grad)
            rows.append(row)
    out = {p.name: float(np.mean([r[p.name] for r in rows])) for p in PREDICTORS}
    laws = [r["growth_law"] for r in rows]
    out["growth_law"] = max(set(laws), key=laws.count)
    out["seconds"] = time.perf_counter() - t0
    return out
