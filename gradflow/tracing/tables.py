"""From a step's device reductions to the tidy tables, with one host transfer.

Hooks only reduce tensors on the device (norms and means, shape [B]; weight
quantities, one number per unit); every derived number (ratios, cosines,
variances, quantiles) is computed here, once per step, in float64 on the host.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

# Per-sample quantities of the built-in tables, in column order.
QUANTITIES = ("x_norm", "x_rms", "x_mean", "h_norm", "r_norm", "coef", "grad_norm", "grad_ratio",
              "direct_norm", "direct_ratio", "ref_ratio", "residual_norm", "cos_direct_residual",
              "cancel")
SUMMARIES = ("std", "q05", "q50", "q95")
# Raw reductions proportional to the loss's scale (AMP's GradScaler multiplies the loss).
GRAD_SCALED = ("grad_norm", "direct_norm", "residual_norm", "ref_norm")
GRAD_SCALED_SQ = ("dot_direct_residual",)


class Packed:
    """A micro-batch's reductions in one device tensor, on its way to the host (see :func:`pack`)."""

    __slots__ = ("host", "event", "n", "B", "cols", "scols")

    def __init__(self, host, event, n: int, B: int, cols: list, scols: list):
        self.host, self.event, self.n, self.B, self.cols, self.scols = host, event, n, B, cols, scols


def _gather(rows: list) -> dict:
    """name -> ([row index], [tensor]) over the rows that have it, in row order.

    A row is a dict, or a tuple of dicts read as one merged dict (later ones win a name).
    """
    cols: dict = {}
    for i, row in enumerate(rows):
        for st in (row,) if isinstance(row, dict) else row:
            for k, t in st.items():
                e = cols.get(k)
                if e is None:
                    cols[k] = ([i], [t])
                elif e[0][-1] == i:   # the name again in the same row: the later value wins
                    e[1][-1] = t
                else:
                    e[0].append(i)
                    e[1].append(t)
    return cols


def _stack(ts: list, dev) -> torch.Tensor:
    try:
        return torch.stack(ts)
    except RuntimeError:   # tensors on several devices or of several shapes ([1] for a scalar)
        return torch.stack([t.reshape(ts[0].shape[:1] if dev is None else ()).to(dev or ts[0].device)
                            for t in ts])


def pack(rows: list, scalars: list, host: bool = True) -> Packed:
    """Per-sample reductions (``rows``: name -> [B] per row) and one-number ones (``scalars``: 0-d)
    as one float32 tensor (float64 when any is), copied to the host without waiting (read it with
    :func:`unpack`); ``host=False`` leaves it on the device (a process group gathers it there first).

    A few stacks and one copy per micro-batch, whatever the number of units: the hooks'
    small tensors are let go here, and a CUDA step is not synchronised by recording.
    """
    cols, scols = _gather(rows), _gather(scalars)
    n = len(rows)
    if not cols and not scols:
        return Packed(None, None, n, 0, [], [])
    with torch.no_grad():
        parts = [_stack(ts, None) for _, ts in cols.values()]
        B = parts[0].shape[1] if parts else 0
        dev = parts[0].device if parts else next(iter(scols.values()))[1][0].device
        parts = [p.flatten() for p in parts] + [_stack(ts, dev).reshape(-1) for _, ts in scols.values()]
        parts = [p if p.device == dev else p.to(dev) for p in parts]
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]   # cat promotes: float64 stays
        if flat.dtype != torch.float64:
            flat = flat.float()
        event = None
        if not host:
            out = flat
        elif flat.device.type == "cuda":
            out = flat.to("cpu", non_blocking=True)   # into pinned memory; ready at the event
            event = torch.cuda.Event()
            event.record()
        else:
            out = flat.to("cpu")
    return Packed(out, event, n, B, [(k, e[0]) for k, e in cols.items()],
                  [(k, e[0]) for k, e in scols.items()])


def unpack(p: Packed) -> tuple[dict, dict, int]:
    """Per-sample reductions ([rows, B] float64 arrays by name) and one-number ones ([rows])."""
    if p.host is None:
        return {}, {}, 0
    if p.event is not None:
        p.event.synchronize()
    host = p.host.numpy().astype(np.float64)
    n, B = p.n, p.B
    raw: dict = {}
    off = 0
    for k, idx in p.cols:
        a = raw[k] = np.full((n, B), np.nan)
        a[idx] = host[off:off + len(idx) * B].reshape(len(idx), B)
        off += len(idx) * B
    sc: dict = {}
    for k, idx in p.scols:
        a = sc[k] = np.full(n, np.nan)
        a[idx] = host[off:off + len(idx)]
        off += len(idx)
    return raw, sc, B


def unscale(raw: dict, rows: slice, scale: float) -> None:
    """Undo a GradScaler's loss scale on the gradient reductions of ``rows``."""
    for k in GRAD_SCALED:
        if k in raw:
            raw[k][rows] /= scale
    for k in GRAD_SCALED_SQ:
        if k in raw:
            raw[k][rows] /= scale * scale


def units_table(meta: list[dict], q: dict[str, np.ndarray], columns=QUANTITIES, B: int = 0) -> pd.DataFrame:
    """One row per entry of ``meta``: its identification, then each quantity's batch mean and spread."""
    units = pd.DataFrame(meta)
    empty = any(np.ndim(a) == 2 and not np.shape(a)[1] for a in q.values())
    if empty:
        warnings.warn("the traced batch held 0 samples: each unit's row has batch 0 and NaN for every "
                      "quantity; trace a batch of at least one sample", stacklevel=2)
    units["batch"] = 0 if empty else B
    if "x_rms" in q:  # Var over every element of the batch (equal counts per sample)
        units["x_var"] = np.mean(q["x_rms"] ** 2, axis=1) - np.mean(q["x_mean"], axis=1) ** 2
    names = [n for n in columns if n in q and n != "cancel"]
    cols = {}
    if names:
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            v = np.stack([q[n] for n in names])                       # [quantities, rows, B]
            mean, std = np.mean(v, axis=2), np.std(v, axis=2)
            qs = (np.quantile(v, [0.05, 0.5, 0.95], axis=2)           # one sort for all of them
                  if v.shape[2] else np.full((3,) + v.shape[:2], np.nan))
        for j, name in enumerate(names):
            cols[name], cols[name + "_std"] = mean[j], std[j]
            cols[name + "_q05"], cols[name + "_q50"], cols[name + "_q95"] = qs[0, j], qs[1, j], qs[2, j]
    if "cancel" in q and "cancel" in columns:
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            cols["cancel_frac"] = np.mean(q["cancel"], axis=1)
    order = []
    for name in columns:   # the tables' column order: the quantities' own
        order += ["cancel_frac"] if name == "cancel" else \
            [name] + [f"{name}_{s}" for s in SUMMARIES]
    cols = {c: cols[c] for c in order if c in cols}
    return pd.concat([units, pd.DataFrame(cols, index=units.index)], axis=1)


def samples_table(meta: list[dict], q: dict[str, np.ndarray], columns=QUANTITIES, B: int = 0) -> pd.DataFrame:
    """One row per entry of ``meta`` and sample: the per-sample values."""
    n = len(meta)
    key = {c: np.repeat(np.array([m[c] for m in meta]), B) for c in ("step", "micro", "phase", "backward", "unit")
           if meta and c in meta[0]}
    data = {**key, "sample": np.tile(np.arange(B), n)}
    for name in columns:
        if name in q:
            data[name] = q[name].ravel()
    return pd.DataFrame(data)
