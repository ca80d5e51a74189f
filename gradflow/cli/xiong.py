"""Command line for Xiong et al.'s Theorem 1 measured: ``python -m gradflow xiong --out figures``.

The measurement is :mod:`gradflow.experiments.xiong`; this draws the figure and writes its caption.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from gradflow.errors import GradflowError
from gradflow.experiments.xiong import fit_exponent, plot_xiong, xiong_ratio, xiong_sweep


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 1,2,4,8)")
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give non-negative integers, e.g. 1,2,4,8")
    return vals


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gradflow xiong",
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
    from gradflow.utils.io import atomic_write, atomic_write_text
    from gradflow.utils.provenance import code_version, hardware
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
        "command: python -m gradflow xiong " + shlex.join(list(argv if argv is not None
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
