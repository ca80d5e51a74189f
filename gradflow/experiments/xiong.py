"""Xiong et al. 2020, Theorem 1, measured on the zoo's GPT: post-LN over pre-LN grows like sqrt(L).

"On Layer Normalization in the Transformer Architecture" (ICML 2020), Theorem 1:
at initialisation (Xavier weights, inputs of norm O(sqrt(d))) the gradient of
the last layer's weights W^{2,L} (the second linear layer of the last block's
MLP, ``fc2`` here) satisfies ||dE/dW^{2,L}||_F <= O(d sqrt(ln d)) for post-LN
and O(d sqrt(ln d / L)) for pre-LN, L the number of blocks: their ratio grows
like sqrt(L). The reason: pre-LN's residual stream x_L has ||x_L||^2 growing
like L (each unit adds an O(1) term), and the final LayerNorm divides the
gradient by ||x_L||; post-LN normalises after every addition.

:func:`xiong_sweep` builds one GPT per (unit, depth, seed) with
``init="xavier"`` (the theorem's setting), runs one forward and backward on a
seeded batch of random tokens with random next-token targets (mean
cross-entropy), and records ||dE/dW_fc2||_F of the last block by plain autograd.
:func:`xiong_ratio` turns that into the ratio beside sqrt(L) and
:func:`fit_exponent` fits the power of L (the theorem says 0.5). With the
``gpt2`` init (N(0, 0.02) embeddings, residual projections scaled by
1/sqrt(2L)) the stream does not grow with depth and the ratio stays flat: the
theorem's premise, not only its conclusion, is what the init decides.

``python -m gradflow xiong --out figures`` draws the figure
and writes its caption (command, seeds, hardware, code version).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from gradflow.errors import GradflowError
from gradflow.models.transformer import GPT, TransformerSpec


def last_layer_grad_norm(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> float:
    """||dE/dW||_F of the last block's ``fc2`` after one backward of the mean next-token cross-entropy.

    Args:
        model: a zoo GPT (its gradients are zeroed first).
        idx, targets: token ids and targets [B, T].
    Returns:
        The Frobenius norm of the gradient of ``blocks[-1].mlp.branch.fc2.weight``.
    """
    model.zero_grad(set_to_none=True)
    logits = model(idx)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return float(model.blocks[-1].mlp.branch.fc2.weight.grad.norm())


def xiong_sweep(depths: Sequence[int] = (1, 2, 4, 8, 16, 32), units: Sequence[str] = ("post_ln", "pre_ln"),
                seeds: Sequence[int] = (0, 1, 2), d_model: int = 64, n_head: int = 4, seq_len: int = 32,
                batch: int = 8, vocab_size: int = 256, init: str = "xavier",
                device: str = "cpu") -> pd.DataFrame:
    """||dE/dW_fc2|| of the last block at init, per unit type, depth and seed.

    Args:
        depths: numbers of blocks L to build.
        units: unit types (``TransformerSpec.unit``) to compare.
        seeds: each seed builds fresh weights (``torch.manual_seed(seed)``) and
            draws its own batch (a generator seeded with ``seed``), the same for
            every unit type and depth.
        d_model, n_head, seq_len, batch, vocab_size: the GPT's size and the batch.
        init: ``"xavier"`` (the theorem's setting) or ``"gpt2"``.
        device: where to run.
    Returns:
        One row per (unit, n_layer, seed): ``grad_norm``, and ``d_model``/``init``.
    """
    if not depths or min(depths) < 1:
        raise GradflowError(f"depths={list(depths)!r}: give positive numbers of blocks, e.g. 1,2,4,8,16,32")
    if not seeds:
        raise GradflowError("seeds=(): give at least one seed")
    rows = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        idx = torch.randint(0, vocab_size, (batch, seq_len), generator=gen).to(device)
        targets = torch.randint(0, vocab_size, (batch, seq_len), generator=gen).to(device)
        for L in depths:
            for unit in units:
                torch.manual_seed(int(seed))
                model = GPT(TransformerSpec(unit=unit, init=init), vocab_size=vocab_size, seq_len=seq_len,
                            n_layer=int(L), d_model=d_model, n_head=n_head).to(device)
                rows.append(dict(unit=unit, n_layer=int(L), seed=int(seed), d_model=d_model, init=init,
                                 grad_norm=last_layer_grad_norm(model, idx, targets)))
    return pd.DataFrame(rows)


def xiong_ratio(sweep: pd.DataFrame, num: str = "post_ln", den: str = "pre_ln") -> pd.DataFrame:
    """Per depth: the mean gradient norms over seeds, their ratio num/den, and sqrt(L).

    ``ratio_over_sqrt_L`` is flat where the theorem's scaling holds.
    """
    for u in (num, den):
        if u not in set(sweep["unit"]):
            raise GradflowError(f"unit {u!r} is not in the sweep (it has {sorted(set(sweep['unit']))})")
    mean = sweep.groupby(["n_layer", "unit"])["grad_norm"].mean().unstack("unit")
    out = pd.DataFrame({"n_layer": mean.index, num: mean[num].to_numpy(), den: mean[den].to_numpy()})
    out["ratio"] = out[num] / out[den]
    out["sqrt_L"] = np.sqrt(out["n_layer"])
    out["ratio_over_sqrt_L"] = out["ratio"] / out["sqrt_L"]
    return out.reset_index(drop=True)


def fit_exponent(ratio: pd.DataFrame, min_layers: int = 1) -> float:
    """The least-squares slope of log(ratio) against log(L) over depths >= ``min_layers`` (theorem: 0.5)."""
    r = ratio[ratio["n_layer"] >= min_layers]
    if len(r) < 2:
        raise GradflowError(f"fit_exponent needs two depths >= {min_layers}; the sweep has {list(ratio['n_layer'])}")
    return float(np.polyfit(np.log(r["n_layer"]), np.log(r["ratio"]), 1)[0])


def plot_xiong(ratio: pd.DataFrame, num: str = "post_ln", den: str = "pre_ln", title: Optional[str] = None):
    """Two panels: the gradient norms against L, and their ratio beside c sqrt(L). Returns the Figure."""
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    L = ratio["n_layer"].to_numpy(float)
    a.loglog(L, ratio[num], "o-", label=num)
    a.loglog(L, ratio[den], "s-", label=den)
    a.set_xlabel("blocks L")
    a.set_ylabel(r"$\|\partial E/\partial W^{2,L}\|_F$ (last fc2)")
    a.legend()
    slope = fit_exponent(ratio)
    c = float(np.exp(np.mean(np.log(ratio["ratio"]) - 0.5 * np.log(L))))   # best c for c sqrt(L)
    b.loglog(L, ratio["ratio"], "o-", label=f"measured {num}/{den} (fit L^{slope:.2f})")
    b.loglog(L, c * np.sqrt(L), "k--", label=rf"${c:.2f}\sqrt{{L}}$ (Xiong et al. 2020, Thm. 1)")
    b.set_xlabel("blocks L")
    b.set_ylabel("ratio")
    b.legend(fontsize=8)
    fig.suptitle(title or "Gradient of the last layer's weights at init: post-LN over pre-LN")
    fig.tight_layout()
    return fig
