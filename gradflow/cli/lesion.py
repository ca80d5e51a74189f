"""Command line for the lesion study: ``python -m gradflow lesion --checkpoint RUN --data DIR``.

The study itself (removing and reordering units at test time) is :mod:`gradflow.experiments.lesion`.
"""
from __future__ import annotations

from typing import Optional

import pandas as pd

from gradflow.errors import GradflowError
from gradflow.experiments.lesion import LesionResult, cifar_test_batches, lesion_study, plain_blocks


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GradflowError(f"{what} {text!r}: give comma-separated integers, e.g. 1,2,5,10") from None
    if any(v < 0 for v in vals):
        raise GradflowError(f"{what} {text!r}: the numbers must be >= 0")
    return vals


def get_args_parser():
    from gradflow.cli.args import Parser
    p = Parser(prog="python -m gradflow lesion",
                                description="Veit et al.'s lesion study on a trained checkpoint: test error "
                                            "with units' branches removed and units reordered.")
    p.add_argument("--checkpoint", required=True, help="a gradflow run folder or its checkpoint.pt")
    p.add_argument("--data", help="CIFAR folder (the release tarball or its extracted folder)")
    p.add_argument("--synthetic", action="store_true", help="the generated data of train --synthetic runs")
    p.add_argument("--no-verify", action="store_true", help="skip the md5 check (re-packed data)")
    p.add_argument("--plain", help="a trained plain network's run folder (e.g. --model plain110), the contrast")
    p.add_argument("--test-images", type=int, default=0, help="first N test images (0: all)")
    p.add_argument("--ks", default="1,2,5,10,20", help="how many units to remove at once")
    p.add_argument("--swaps", default="1,2,5,10,20", help="how many random swaps of same-stage units")
    p.add_argument("--draws", type=int, default=5, help="random draws per k and per swap count")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output folder (default runs/lesion/<run name>)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def run_cli(args) -> dict:
    """Everything :func:`main` does, returning the summary (raises GradflowError on bad input)."""
    import json
    from pathlib import Path
    from gradflow.runs.checkpoint import load_checkpoint
    from gradflow.cli.args import resolve_device
    from gradflow.utils.io import atomic_write
    from gradflow.cli.args import check_flags
    check_flags(args)
    if args.synthetic and args.data:
        raise GradflowError(f"--synthetic and --data {args.data}: pass one of them (the generated data or "
                            "the CIFAR folder)")
    if args.draws < 1 or args.batch_size < 1 or args.test_images < 0:
        raise GradflowError(f"--draws {args.draws}, --batch-size {args.batch_size}, --test-images "
                            f"{args.test_images}: draws and batch size must be >= 1, test images >= 0")
    ks, swaps = _ints(args.ks, "--ks"), _ints(args.swaps, "--swaps")
    device = resolve_device(args.device)
    model, info = load_checkpoint(args.checkpoint, map_location=device)
    batches, described = cifar_test_batches(info, args, device)
    results = [lesion_study(model, batches, ks=ks, draws=args.draws, swaps=swaps, seed=args.seed,
                            network=info.get("model", "model"))]
    if args.plain:
        plain, pinfo = load_checkpoint(args.plain, map_location=device)
        results.append(lesion_study(plain, batches, blocks=plain_blocks(plain), ks=ks, draws=args.draws,
                                    swaps=swaps, seed=args.seed, network=pinfo.get("model", "plain")))
    table = pd.concat([r.table() for r in results], ignore_index=True)
    out = Path(args.out or Path("runs") / "lesion" / Path(args.checkpoint).resolve().name)
    out.mkdir(parents=True, exist_ok=True)
    summary = dict(checkpoint=str(args.checkpoint), plain=args.plain, data=described, seed=args.seed,
                   draws=args.draws, networks=[_summary(r) for r in results])
    atomic_write(out / "lesion.csv", lambda f: f.write(table.to_csv(index=False).encode()))
    atomic_write(out / "summary.json", lambda f: f.write(json.dumps(summary, indent=2, default=float).encode()))
    try:
        from gradflow.plot import lesion_curves
        fig = lesion_curves(results)
        atomic_write(out / "lesion.png", lambda f: fig.savefig(f, format="png", dpi=120))
    except ImportError:
        pass
    summary["out"] = str(out)
    return summary


def _summary(r: LesionResult) -> dict:
    single = r.single.dropna(subset=["error"]) if len(r.single) else r.single
    d = dict(network=r.network, baseline_error=r.baseline, notes=r.notes)
    if len(single):
        d["single_removal_error"] = dict(mean=float(single["error"].mean()), max=float(single["error"].max()),
                                         worst_unit=str(single.loc[single["error"].idxmax(), "name"]))
    if len(r.random):
        d["k_removed_error"] = {int(k): float(g["error"].mean()) for k, g in r.random.groupby("k")}
    if len(r.reorder):
        d["reorder_error"] = {int(s): dict(kendall_tau=float(g["kendall_tau"].mean()), error=float(g["error"].mean()))
                              for s, g in r.reorder.groupby("swaps")}
    return d


def format_summary(summary: dict) -> str:
    lines = [f"lesion study of {summary['checkpoint']} on {summary['data']}"]
    for n in summary["networks"]:
        lines.append(f"  {n['network']}: intact test error {n['baseline_error']:.2f}%")
        if "single_removal_error" in n:
            s = n["single_removal_error"]
            lines.append(f"    one unit removed: mean {s['mean']:.2f}%, worst {s['max']:.2f}% ({s['worst_unit']})")
        for k, e in n.get("k_removed_error", {}).items():
            lines.append(f"    {k} units removed: {e:.2f}%")
        for s, v in n.get("reorder_error", {}).items():
            lines.append(f"    {s} swaps (Kendall tau {v['kendall_tau']:.2f}): {v['error']:.2f}%")
        lines += [f"    note: {t}" for t in n["notes"]]
    lines.append(f"files in {summary['out']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m gradflow lesion``: 0 on success, 2 on bad input (one line naming the value and the fix)."""
    import json
    import sys
    args = get_args_parser().parse_args(argv)
    try:
        summary = run_cli(args)
    except GradflowError as e:
        print(f"gradflow lesion: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=float) if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
