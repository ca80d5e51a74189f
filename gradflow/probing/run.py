"""``run_probe(config) -> ProbeResult``: build, take a batch, one traced step, tables and summary."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Optional

import pandas as pd
import torch
import torch.nn.functional as F

from ..errors import GradflowError
from ..theory import predict_direct
from ..tracing import trace
from .config import ProbeConfig
from .inputs import Inputs, cifar_test, find_test_file, synthetic
from .models import BuiltModel, build_model

DEFAULT_BATCH_32 = 16   # resnet1001 probes in < 20 s on 2 CPU cores (benchmarks/probe_bench.py)
DEFAULT_BATCH_LARGE = 8  # 224 px ImageNet-sized models on a laptop CPU


@dataclass
class VariantResult:
    """One probed network: its units table (with the predictions joined) and summary."""

    label: str
    model: str
    options: dict
    source: str
    units: pd.DataFrame       # tracer's table + pred_direct_ratio, direct_vs_pred, pred_basis
    summary: dict             # Tracer.summary(): fitted rates against eq. (5)/(8)
    timings: dict             # seconds: build, step (each traced batch), summary
    checkpoint_info: Optional[dict] = None


@dataclass
class ProbeResult:
    """The probe's records: one VariantResult per probed network, and the resolved config."""

    config: dict                        # ProbeConfig resolved: batch size, image size, device, versions
    inputs: str                         # which input was used, in words
    variants: dict = field(default_factory=dict)  # label -> VariantResult

    @property
    def units(self) -> pd.DataFrame:
        """All variants' units tables, one below the other, with a ``config`` column first."""
        frames = [v.units.assign(config=label) for label, v in self.variants.items()]
        df = pd.concat(frames, ignore_index=True)
        return df[["config"] + [c for c in df.columns if c != "config"]]

    def figure(self):
        from .figure import probe_figure
        return probe_figure({k: v.units for k, v in self.variants.items()})


# the one device resolver lives in gradflow.cli (shared with the trainer); re-exported here
from ..cli import resolve_device  # noqa: E402


def run_probe(config: ProbeConfig) -> ProbeResult:
    """Probe every variant of ``config`` (one, or the ``compare`` set) on the same input batches."""
    from .. import __version__
    device = resolve_device(config.device)
    variants = config.variants()
    if config.data and config.checkpoint is None:  # CIFAR-100 data: 100 outputs unless told otherwise
        from pathlib import Path
        if find_test_file(Path(config.data).expanduser())[0] == "cifar100":
            variants = {k: _with_classes(v, 100) for k, v in variants.items()}
    first = next(iter(variants.values()))
    built = build_model(first.model, first.options, config.seed, first.checkpoint)
    image_size = config.image_size or built.image_size
    batch_size = config.batch_size or (DEFAULT_BATCH_32 if image_size <= 64 else DEFAULT_BATCH_LARGE)
    inputs = (cifar_test(config.data, batch_size, config.batches, image_size) if config.data
              else synthetic(batch_size, config.batches, image_size, config.seed))
    resolved = dict(config.as_dict(), batch_size=batch_size, image_size=image_size, device=str(device),
                    inputs=inputs.description, versions={"gradflow": __version__, "torch": torch.__version__})
    result = ProbeResult(resolved, inputs.description)
    bar = _progress(len(variants), config.progress)
    try:
        for i, (label, cfg) in enumerate(variants.items()):
            if bar is not None:
                bar.set_description(label)
            t0 = time.perf_counter()
            if i > 0:
                built = build_model(cfg.model, cfg.options, config.seed, cfg.checkpoint)
            build_s = time.perf_counter() - t0
            result.variants[label] = probe_model(built, inputs, cfg, device, label, build_s)
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return result


def probe_model(built: BuiltModel, inputs: Inputs, cfg: ProbeConfig, device: torch.device,
                label: str, build_s: float = 0.0) -> VariantResult:
    """One traced forward/backward per input batch of ``built.module``; tables and summary."""
    model = built.module.to(device)
    model.train(cfg.mode == "train")
    # The probe reads dE/dx_l only: weight gradients would cost a second backward matmul per layer.
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # dropout shortcuts draw their masks from here
    steps = []
    with trace(model) as tr:
        for x, y in inputs:
            x, y = x.to(device), y.to(device)
            t0 = time.perf_counter()
            traced_step(model, x, y, synthetic_labels=inputs.dataset is None)
            _sync(device)
            steps.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    units = tr.units
    summary = tr.summary()
    units = predict_direct(units) if "direct_ratio" in units else units
    timings = dict(build=build_s, steps=steps, summary=time.perf_counter() - t0)
    return VariantResult(label, built.name, built.options, built.source, units.reset_index(drop=True),
                         summary, timings, built.info)


def traced_step(model, x, y, synthetic_labels: bool) -> None:
    """Forward, mean cross-entropy, backward. Synthetic labels are taken modulo the classes."""
    logits = model(x)
    if logits.ndim != 2:
        raise GradflowError(f"the model returns logits of shape {tuple(logits.shape)}; the probe "
                            "needs [batch, classes] (a classifier)")
    classes = logits.shape[1]
    if synthetic_labels:
        y = y % classes
    elif int(y.max()) >= classes:
        raise GradflowError(f"the data has labels up to {int(y.max())} but the model has {classes} "
                            "outputs: pass --num-classes 100 for CIFAR-100 (zoo models)")
    F.cross_entropy(logits, y).backward()


def _with_classes(cfg: ProbeConfig, n: int) -> ProbeConfig:
    if ":" in cfg.model or "num_classes" in cfg.options:
        return cfg
    return replace(cfg, options={**cfg.options, "num_classes": n})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _progress(n: int, enabled: bool):
    if n < 2 or not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=n, unit="net", leave=False)
