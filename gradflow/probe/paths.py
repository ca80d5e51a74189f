"""``python -m gradflow.probe --paths``: each probed network's gradient split by path length, summarised.

The tables are :mod:`gradflow.theory.paths`; the split is :mod:`gradflow.tracing.paths`.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F

from gradflow.errors import GradflowError
from gradflow.theory.paths import effective_range


def probe_paths(config, result, max_len: Optional[int] = None) -> dict:
    """The effective path range of each network the probe measured (``python -m gradflow.probe --paths``).

    Rebuilds each variant as the probe did (same seed, checkpoint, mode and first input
    batch), splits dE/dx_l by path length and summarises the first unit's split.

    Args:
        config: the probe's ProbeConfig; result: its ProbeResult (batch and image size used).
        max_len: lengths kept apart (None: all).
    Returns:
        label -> dict(n_units, lo, hi, peak, held, path_share, truncated, direct_proj,
        remainder_proj, sum_rel_err), or dict(note=...) where the split is not available.
    """
    from gradflow.tracing.paths.components import path_components
    from gradflow.probe.inputs import cifar_test, synthetic, synthetic_tokens
    from gradflow.probe.models import build_model
    from gradflow.probe.step import borrowed
    from gradflow.utils.checks import resolve_device
    rc = result.config
    device = resolve_device(config.device)
    out: dict = {}
    for label, cfg in config.variants().items():
        built = build_model(cfg.model, cfg.options, config.seed, cfg.checkpoint)
        if built.tokens:
            inputs = synthetic_tokens(rc["batch_size"], 1, built.tokens["seq_len"], built.tokens["vocab_size"],
                                      config.seed)
        elif config.data:
            inputs = cifar_test(config.data, rc["batch_size"], 1, rc["image_size"])
        else:
            inputs = synthetic(rc["batch_size"], 1, rc["image_size"], config.seed)
        x, y = inputs.batches[0]
        x, y = x.to(device), y.to(device)
        synthetic_labels = not config.data

        def loss_fn(logits):
            logits = getattr(logits, "logits", logits)
            t = y
            if logits.ndim == 3 and t.ndim == 2:
                logits, t = logits.flatten(0, 1), t.flatten()
            return F.cross_entropy(logits, t % logits.shape[1] if synthetic_labels else t)
        try:
            with borrowed(built.module, device, train=cfg.mode == "train", weight_grads=False):
                res = path_components(built.module, x, loss_fn=loss_fn, max_len=max_len)
        except GradflowError as e:
            out[label] = dict(note=str(e))
            continue
        first = res.table[res.table["unit"] == res.table["unit"].min()]
        r = effective_range(res.table)
        out[label] = dict(n_units=int(first["n_units"].iloc[0]), lo=r["lo"], hi=r["hi"], peak=r["peak"],
                          held=r["held"], path_share=r["path_share"], truncated=r["truncated"],
                          direct_proj=float(first.loc[first["k"] == 0, "proj"].iloc[0]),
                          remainder_proj=float(first.loc[first["k"] < 0, "proj"].sum()),
                          sum_rel_err=float(res.units["sum_rel_err"].max()))
    return out


def format_probe_paths(paths: dict) -> str:
    """Lines for the probe's text report."""
    lines = ["paths (Veit et al. 2016), dE/dx at the first unit split exactly by the number k of branches passed:"]
    for label, p in paths.items():
        if "note" in p:
            lines.append(f"  {label}: not split: {p['note']}")
            continue
        where = (f"k = {p['lo']}-{p['hi']} of {p['n_units']} (peak {p['peak']}; "
                 f"{100 * p['path_share']:.3g}% of the 2^{p['n_units']} paths)")
        if p["truncated"]:
            where = f"not known: more than 10% lies beyond max_len (remainder share {p['remainder_proj']:.3g})"
        lines.append(f"  {label}: 90% of sum_k ||g^(k)|| on {where}; direct path (k = 0) carries "
                     f"{p['direct_proj']:.3g} of dE/dx (signed share)")
    return "\n".join(lines)
