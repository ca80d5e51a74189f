"""Cost of the exact path-length split, as ratios against the same model's plain forward+backward.

For each model: one training step (forward, cross-entropy, backward: the
baseline), the full spectrum (every path length k, ``path_components``) and the
spectrum cut at ``max_len`` (lengths 0..max_len apart, the rest summed), timed
interleaved in one process and repeated (median). The ratios are what the
issue's targets are about (issue 12: full <= 8x, max_len=20 <= 4x on resnet110
at batch 16); a shared machine slows all three alike, more or less.

    python benchmarks/paths_bench.py                            # resnet110 and resnet164, batch 16
    python benchmarks/paths_bench.py --models resnet20 --repeats 1 --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet110,resnet164")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import gradflow
    from gradflow.paths import path_components
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = gradflow.create_model(name).to(args.device)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 3, 32, 32, generator=g).to(args.device)
        y = torch.randint(0, 10, (args.batch,), generator=g).to(args.device)

        def plain():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        modes = {"plain": plain,
                 "full": lambda: path_components(model, x, y=y),
                 f"max_len={args.max_len}": lambda: path_components(model, x, y=y, max_len=args.max_len)}
        for fn in modes.values():   # warm-up
            fn()
        times: dict = {k: [] for k in modes}
        for _ in range(args.repeats):
            for k, fn in modes.items():
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = dict(model=name, batch=args.batch, device=args.device, threads=torch.get_num_threads(),
                   **{f"{k}_s": v for k, v in med.items()},
                   **{f"{k}_ratio": med[k] / med["plain"] for k in modes if k != "plain"})
        rows.append(row)
        if not args.json:
            print(f"{name} batch {args.batch} on {args.device} ({row['threads']} threads): plain step "
                  f"{med['plain']:.3f} s; " + "; ".join(f"{k} {med[k]:.3f} s = {med[k] / med['plain']:.2f}x"
                                                       for k in modes if k != "plain"))
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
