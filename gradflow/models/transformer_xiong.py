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

``python -m gradflow.models.transformer_xiong --out figures`` draws the figure
and writes its caption (command, seeds, hardware, code version).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..errors import GradflowError
from .transformer import GPT, TransformerSpec


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


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 1,2,4,8)")
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give non-negative integers, e.g. 1,2,4,8")
    return vals


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gradflow.models.transformer_xiong",
                                description="Xiong et al. 2020 Theorem 1 on the zoo's GPT: figure and caption.")
    p.add_argument("--out", default="figures", help="folder for xiong_post_vs_pre_ln.{png,txt,csv}")
    p.add_argument("--depths", type=_ints, default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--init", default="xavier", choices=["xavier", "gpt2"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    from ..io import atomic_write, atomic_write_text
    from ..provenance import code_version, hardware
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads {args.threads}: give a positive number of threads", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        sweep = xiong_sweep(args.depths, seeds=args.seeds, d_model=args.d_model, n_head=args.n_head,
                            seq_len=args.seq_len, batch=args.batch, init=args.init)
    except GradflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ratio = xiong_ratio(sweep)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "xiong_post_vs_pre_ln" + ("" if args.init == "xavier" else f"_{args.init}")
    fig = plot_xiong(ratio)
    atomic_write(out / f"{name}.png", lambda f: fig.savefig(f, format="png", dpi=120))
    atomic_write_text(out / f"{name}.csv", ratio.to_csv(index=False))
    code = code_version()
    lines = [
        f"{name}: ||dE/dW|| of the last block's fc2 at init, post-LN and pre-LN GPTs, and their ratio "
        "beside sqrt(L) (Xiong et al. 2020, Theorem 1: the ratio grows like sqrt(L)).",
        f"made at initialisation (no training): GPT d_model={args.d_model}, n_head={args.n_head}, init={args.init}, "
        f"depths {args.depths}, seeds {args.seeds} (weights torch.manual_seed(seed); batch of "
        f"{args.batch} x {args.seq_len} uniform random tokens and targets over 256 ids from a generator seeded "
        "with seed), mean next-token cross-entropy, one forward and backward; points are means over seeds.",
        f"fitted exponent of L: {fit_exponent(ratio):.3f} over all depths"
        + (f", {fit_exponent(ratio, 4):.3f} over L >= 4" if (ratio["n_layer"] >= 4).sum() >= 2 else "")
        + " (theorem, an upper bound's scaling in L: 0.5); ratio / sqrt(L) per depth: "
        + ", ".join(f"L={int(r.n_layer)}: {r.ratio_over_sqrt_L:.3f}" for r in ratio.itertuples()),
        "command: python -m gradflow.models.transformer_xiong " + shlex.join(list(argv if argv is not None
                                                                                  else sys.argv[1:])),
        f"gradflow: {code.get('gradflow', '?')}, git commit {code.get('git_commit', 'unknown')}"
        + (" with uncommitted changes" if code.get("git_dirty") else ""),
        f"torch: {torch.__version__}, python {sys.version.split()[0]}",
        f"hardware: {hardware()}",
    ]
    atomic_write_text(out / f"{name}.txt", "\n".join(lines) + "\n")
    print(ratio.to_string(index=False))
    print(f"wrote {out / name}.png, .txt, .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
