"""``run_probe(config) -> ProbeResult``: build, take a batch, one traced step, tables and summary."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import pandas as pd
import torch

from gradflow.errors import GradflowError
from gradflow.theory import predict_direct
from gradflow.theory.profile import profile_fits
from gradflow.theory.robust import batch_size, degenerate_samples, median_ratios
from gradflow.theory.total import predict_total
from gradflow.probe.config import ProbeConfig
from gradflow.probe.inputs import Inputs, cifar_test, find_test_file, synthetic, synthetic_tokens
from gradflow.probe.models import BuiltModel, build_model, refuse_input
from gradflow.probe.quantities import probe_quantities
from gradflow.utils.memory import check_fits, step_estimate
from gradflow.probe.step import trace_once, traced_step  # noqa: F401  (traced_step: re-exported, benchmarks use it)

DEFAULT_BATCH_32 = 16   # resnet1001 at batch 16: benchmarks/probe_bench.py (2 CPU cores)
DEFAULT_BATCH_LARGE = 8  # 224 px ImageNet-sized models on a laptop CPU
DEFAULT_BATCH_TOKENS, DEFAULT_SEQ = 8, 128  # token models: gpt-small (12 x 256) in seconds on 2 cores


@dataclass
class VariantResult:
    """One probed network: its units table (with the predictions joined) and summary."""

    label: str
    model: str
    options: dict
    source: str
    units: pd.DataFrame       # tracer's table + pred_direct_ratio, direct_vs_pred, pred_basis
    summary: dict             # Tracer.summary(): fitted rates against eq. (5)/(8)
    timings: dict             # seconds: build, steps (each traced batch), tables (tables + summary)
    checkpoint_info: Optional[dict] = None
    analysis: dict = field(default_factory=dict)  # from the samples: degenerate samples, profile fits


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
        from gradflow.plot import probe_overview
        return probe_overview({k: v.units for k, v in self.variants.items()}, title=self.title())

    def title(self) -> str:
        """What was probed, in one line: the networks (with their options), the input, the mode."""
        def named(label: str, v: VariantResult) -> str:
            opts = " ".join(f"{k}={val}" for k, val in sorted(v.options.items()) if f"{k}={val}" not in label)
            return f"{label} ({opts})" if opts else label
        nets = " vs ".join(named(k, v) for k, v in self.variants.items())
        return f"{nets}: {self.inputs}; {self.config.get('mode', 'train')} mode"


# the one device resolver lives in gradflow.cli.args (shared with the trainer); re-exported here
from gradflow.utils.checks import resolve_device  # noqa: E402


def run_probe(config: ProbeConfig) -> ProbeResult:
    """Probe every variant of ``config`` (one, or the ``compare`` set) on the same input batches.

    Variants are built and probed one at a time: each network (and its traced
    graph) is released before the next is built, so ``--compare`` needs the
    memory of one variant, not of all.

    Args:
        config: what to probe: the model and its options (or a checkpoint), the
            input (synthetic or CIFAR test images), batch size, mode, device, seed,
            and the ``compare`` variants.
    Returns:
        A :class:`ProbeResult`: the resolved config, the input used, and per
        variant its units table (predictions joined), summary and timings. Turn
        it into words with :func:`gradflow.probe.report_dict` /
        :func:`gradflow.probe.format_report`, into files with
        :func:`gradflow.probe.write_outputs`.
    """
    from gradflow import __version__
    device = resolve_device(config.device)
    variants = config.variants()
    if config.data and config.checkpoint is None:  # CIFAR-100 data: 100 outputs unless told otherwise
        from pathlib import Path
        if find_test_file(Path(config.data).expanduser())[0] == "cifar100":
            variants = {k: _with_classes(v, 100) for k, v in variants.items()}
    first = next(iter(variants.values()))
    t0 = time.perf_counter()
    built: Optional[BuiltModel] = build_model(first.model, first.options, config.seed, first.checkpoint,
                                              config.image_size)
    build_s = time.perf_counter() - t0
    tokens, seq_len = built.tokens, None
    if tokens is not None:
        inputs, batch_size, seq_len = _token_inputs(config, first.model, tokens)
        image_size = None
    else:
        if config.seq_len is not None:
            raise GradflowError(f"--seq-len {config.seq_len}: {first.model} takes images, not token ids; "
                                "use --image-size")
        image_size = config.image_size or built.image_size
        batch_size = config.batch_size or (DEFAULT_BATCH_32 if image_size <= 64 else DEFAULT_BATCH_LARGE)
        shape = (batch_size, 3, image_size, image_size)
        check_fits(step_estimate(built.module, shape, device), device,
                   f"probing {first.model} at batch {batch_size}, {image_size}x{image_size}",
                   "pass a smaller --batch-size or --image-size")   # before the batch is drawn
        inputs = (cifar_test(config.data, batch_size, config.batches, image_size) if config.data
                  else synthetic(batch_size, config.batches, image_size, config.seed))
    resolved = dict(config.as_dict(), batch_size=batch_size, image_size=image_size, seq_len=seq_len,
                    device=str(device),
                    inputs=inputs.description, versions={"gradflow": __version__, "torch": torch.__version__})
    if config.checkpoint is not None:  # the architecture is the checkpoint's, not the --model default
        resolved.update(model=built.name, options=built.options)
    result = ProbeResult(resolved, inputs.description)
    bar = _progress(len(variants), config.progress)
    try:
        for i, (label, cfg) in enumerate(variants.items()):
            if bar is not None:
                bar.set_description(label)
            if i > 0:
                t0 = time.perf_counter()
                built = build_model(cfg.model, cfg.options, config.seed, cfg.checkpoint, config.image_size)
                build_s = time.perf_counter() - t0
                _same_input_kind(label, built, tokens, seq_len)
            result.variants[label] = probe_model(built, inputs, cfg, device, label, build_s)
            built = None   # release this variant before the next is built
            gc.collect()   # the tracer's patched forwards form reference cycles
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return result


def probe_model(built: BuiltModel, inputs: Inputs, cfg: ProbeConfig, device: torch.device,
                label: str, build_s: float = 0.0) -> VariantResult:
    """One traced forward/backward per input batch of ``built.module``; tables and summary.

    The module is used on ``device`` in ``cfg.mode`` with weight gradients off
    (the probe reads dE/dx_l only) and given back as it was found: device,
    modes, ``requires_grad``, BN running statistics and the global RNG state.
    """
    try:
        traced = trace_once(built.module, inputs, cfg.seed, device, train=cfg.mode == "train",
                            weight_grads=False, quantities=probe_quantities(cfg.seed))
    except GradflowError:
        raise
    except Exception as e:
        refuse_input(built, inputs, device, e)   # the model itself refuses the input: say which and why
        raise
    t0 = time.perf_counter()
    units, samples = traced.units, traced.samples
    summary = traced.tracer.summary(pool=True)   # every batch of the probe in one fit
    units = predict_total(median_ratios(predict_direct(units) if "direct_ratio" in units else units))
    units = _with_direct_share(units, samples)
    analysis = dict(batch=batch_size(samples), degenerate=degenerate_samples(samples, units),
                    batchnorm=any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                  for m in built.module.modules()),
                    fits={"total": profile_fits(samples, units, "grad_norm", seed=cfg.seed)})
    timings = dict(build=build_s, steps=traced.step_s, tables=time.perf_counter() - t0)
    return VariantResult(label, built.name, built.options, built.source, units.reset_index(drop=True),
                         summary, timings, built.info, analysis)


def _with_direct_share(units: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    """Add ``direct_share``: the batch mean of ||direct term|| / ||dE/dx_l|| per sample, per unit and step."""
    if "direct_norm" not in samples or "grad_norm" not in samples:
        return units
    share = (samples["direct_norm"] / samples["grad_norm"]).groupby([samples["step"], samples["unit"]]).mean()
    return units.join(share.rename("direct_share"), on=["step", "unit"])


def _token_inputs(config: ProbeConfig, model: str, tokens: dict) -> tuple[Inputs, int, int]:
    """Synthetic token batches for a model that takes token ids: (inputs, batch size, sequence length)."""
    if config.data:
        raise GradflowError(f"--data {config.data}: {model} takes token ids, not CIFAR images; leave --data "
                            "out (the probe draws uniform random tokens)")
    if config.image_size is not None:
        raise GradflowError(f"--image-size {config.image_size}: {model} takes token ids; use --seq-len")
    most = tokens.get("seq_len")
    seq_len = config.seq_len or min(DEFAULT_SEQ, most or DEFAULT_SEQ)
    if most is not None and seq_len > most:
        raise GradflowError(f"--seq-len {seq_len} exceeds the {most} positions {model} has; use "
                            f"--seq-len {most} or less (or build it with more positions)")
    batch_size = config.batch_size or DEFAULT_BATCH_TOKENS
    return (synthetic_tokens(batch_size, config.batches, seq_len, tokens["vocab_size"], config.seed),
            batch_size, seq_len)


def _same_input_kind(label: str, built: BuiltModel, tokens: Optional[dict], seq_len: Optional[int]) -> None:
    """--compare variants share one input: token models need the same vocabulary and room for the sequence."""
    if (built.tokens is None) != (tokens is None):
        raise GradflowError(f"--compare {label!r}: its model takes {'token ids' if built.tokens else 'images'} "
                            "but the first variant's takes the other; compare models of one input kind")
    if tokens is not None and (built.tokens["vocab_size"] != tokens["vocab_size"]
                               or (built.tokens["seq_len"] or seq_len) < seq_len):
        raise GradflowError(f"--compare {label!r}: vocabulary {built.tokens['vocab_size']} and "
                            f"{built.tokens['seq_len']} positions do not fit the shared input "
                            f"({tokens['vocab_size']} ids, sequences of {seq_len})")


def _with_classes(cfg: ProbeConfig, n: int) -> ProbeConfig:
    if ":" in cfg.model or "num_classes" in cfg.options:
        return cfg
    return replace(cfg, options={**cfg.options, "num_classes": n})


def _progress(n: int, enabled: bool):
    if n < 2 or not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=n, unit="net", leave=False)
