"""The predictors of every variant at several init seeds: one table, one row per (variant, seed)."""
from __future__ import annotations

import time
from typing import Callable, Optional

import pandas as pd
import torch

from gradflow.trainability.outcomes import Variant
from gradflow.trainability.predictors import EPS, PREDICTORS, measure


def inputs(seed: int, batch_size: int, batches: int, data: Optional[str] = None) -> list:
    """``batches`` batches of ``batch_size`` inputs (each paired with its moved copy in the step):
    N(0, 1) images seeded by ``seed``, or the first CIFAR test images under ``data``."""
    from gradflow.probe.inputs import cifar_test, synthetic
    got = cifar_test(data, batch_size, batches, 32) if data else synthetic(batch_size, batches, 32, seed)
    return got.batches


def measure_variants(vs: list[Variant], seeds: int = 3, width: float = 0.5, batch_size: int = 8,
                     batches: int = 2, data: Optional[str] = None, eps: float = EPS, probes: int = 1,
                     device: Optional[torch.device] = None, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Build each variant at seeds 0..seeds-1 (He init, ``width``) and measure every predictor.

    Args:
        vs: the variants (:func:`gradflow.trainability.outcomes.variants`).
        seeds: init seeds per variant.
        width: channel multiplier (0.5: the laptop sweeps' nets; 1: the paper's).
        batch_size: inputs per batch; the traced batch holds each with its moved copy (2 x batch_size).
        batches: traced steps per seed; the predictors are their mean.
        data: a CIFAR folder for real test images (None: N(0, 1) images).
        eps, probes: see :func:`gradflow.trainability.predictors.measure`.
        device: where to run (None: CPU).
        log: progress lines.
    Returns:
        One row per (variant, seed): ``variant``, ``model``, ``seed``, ``width``, ``batch_size``,
        ``batches``, ``inputs``, every predictor, ``growth_law``, ``seconds``.
    """
    from gradflow.probe.models import build_model
    rows = []
    for v in vs:
        t0 = time.perf_counter()
        for s in range(seeds):
            options = dict(v.options, width=width) if width != 1 else dict(v.options)
            built = build_model(v.model, options, s)
            if device is not None:
                built.module.to(device)
            got = measure(built.module, inputs(s, batch_size, batches, data), s, eps, probes, device)
            rows.append(dict(variant=v.name, model=v.model, seed=s, width=width, batch_size=batch_size,
                             batches=batches, inputs=f"CIFAR test images from {data}" if data else "N(0,1) images",
                             **got))
        log(f"{v.name}: {seeds} seed(s) in {time.perf_counter() - t0:.1f}s")
    cols = (["variant", "model", "seed", "width", "batch_size", "batches", "inputs"] + [p.name for p in PREDICTORS]
            + ["growth_law", "seconds"])
    return pd.DataFrame(rows, columns=cols)
