"""Cost of the exact path-length split, as ratios against the same model's plain forward+backward.

For each model: one training step (forward, cross-entropy, backward: the
baseline), the full spectrum (every path length k, ``path_components``) and the
spectrum cut at ``max_len`` (lengths 0..max_len apart, the rest summed), timed
interleaved in one process and repeated (median). The ratios are what the
targets are about (full <= 8x, max_len=20 <= 4x on resnet110
at batch 16, CPU; resnet164 reported too). The route each unit took is printed
(``fast``: all components through a unit in one product per node, from saved
tensors; ``autograd``: one autograd call per component, with the reason).

Beside each measured ratio the script prints the convolution work the exact split cannot
avoid, in closed form from the model's convolution sizes: a component must pass every
branch (and projection) below the point where it starts, so unit l (n - l units above it)
applies its branch to n - l components for the full spectrum and to min(n - l, max_len + 1)
with a cut (lengths 0..max_len - 1 apart, and g^(max_len) with the remainder in one product), against the plain step's three
passes over every convolution (forward, input gradient, weight gradient). A ratio goal below
that bound cannot be met by any exact method that goes unit by unit, only by convolutions
that run faster per row than the baseline's.

On a shared machine use ``--clock cpu`` (this process's CPU time; with one
thread it is the work done, not the waiting): wall-clock ratios then swing
with the other processes' load, which is printed.

    python benchmarks/paths_bench.py --threads 1                 # resnet110 and resnet164, batch 16
    python benchmarks/paths_bench.py --threads 1 --clock cpu     # on a busy machine
    python benchmarks/paths_bench.py --models resnet20 --repeats 1 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter

import torch
import torch.nn.functional as F

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
GOALS = {"full": 8.0, "max_len": 4.0}     # resnet110 at batch 16 on the CPU


def conv_work_bound(model, x, max_len: int) -> dict:
    """Multiply-adds of the split's unavoidable convolutions over the plain step's (closed form).

    Convolution MACs are read from forward hooks (output elements x in_channels/groups x kernel
    area); each convolution inside unit l counts once in the forward and once per component that
    passes it in the split; the plain step counts every convolution three times.
    """
    import gradflow
    units = list(gradflow.units(model))
    n = len(units)
    owner = {}
    for i, u in enumerate(units):
        for mod in u.module.modules():
            owner.setdefault(mod, i)
    macs, per_unit = 0, [0] * n
    handles = []

    def hook(mod, inp, out):
        nonlocal macs
        k = out.numel() * (mod.in_channels // mod.groups) * mod.weight[0, 0].numel()
        macs += k
        if mod in owner:
            per_unit[owner[mod]] += k
    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d):
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    full = macs + sum(per_unit[l] * (n - l) for l in range(n))
    cut = macs + sum(per_unit[l] * min(n - l, max_len + 1) for l in range(n))
    return {"full": full / (3 * macs), "max_len": cut / (3 * macs), "units": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet110,resnet164")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (for a shared machine)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--autograd", action="store_true",
                   help="also time the autograd route (fast=False) for comparison (slow)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    if args.clock == "cpu" and args.device.startswith("cuda"):
        p.error("--clock cpu measures the CPU's work; on CUDA use --clock wall")
    import gradflow
    from gradflow.tracing.paths.components import path_components
    if not args.json:
        print(f"device={args.device} batch={args.batch} threads={torch.get_num_threads()} clock={args.clock} "
              f"torch={torch.__version__} load={os.getloadavg()[0]:.1f}")
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

        cut = f"max_len={args.max_len}"
        modes = {"plain": plain,
                 "full": lambda: path_components(model, x, y=y),
                 cut: lambda: path_components(model, x, y=y, max_len=args.max_len)}
        if args.autograd:
            modes["full_autograd"] = lambda: path_components(model, x, y=y, fast=False)
        bound = conv_work_bound(model, x, args.max_len)
        routes = Counter(path_components(model, x, y=y, max_len=1).units["vjp"])   # also a warm-up
        for fn in modes.values():   # warm-up
            fn()
        times: dict = {k: [] for k in modes}
        for _ in range(args.repeats):
            for k, fn in modes.items():
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = clock()
                fn()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[k].append(clock() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = dict(model=name, batch=args.batch, device=args.device, threads=torch.get_num_threads(),
                   clock=args.clock, routes=dict(routes),
                   **{f"{k}_s": v for k, v in med.items()},
                   **{f"{k}_ratio": med[k] / med["plain"] for k in modes if k != "plain"},
                   conv_bound_full=bound["full"], conv_bound_max_len=bound["max_len"])
        rows.append(row)
        if not args.json:
            print(f"{name} batch {args.batch}: plain forward+backward {med['plain']:.3f} s; "
                  + "; ".join(f"{k} {med[k]:.3f} s = {med[k] / med['plain']:.2f}x" for k in modes if k != "plain"))
            print(f"  goals (resnet110): full <= {GOALS['full']:.0f}x, {cut} <= {GOALS['max_len']:.0f}x;"
                  f" routes: " + ", ".join(f"{n} units {r}" for r, n in routes.items()))
            print(f"  convolution work the exact split cannot avoid ({bound['units']} units, closed form): "
                  f"full >= {bound['full']:.2f}x, {cut} >= {bound['max_len']:.2f}x the plain step's")
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
