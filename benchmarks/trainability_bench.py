"""How long do the trainability predictors take? Target: every Table 1 and Table 2 variant (25
networks: Table 1's 16 rows and Table 2's 10, its ResNet-110 original being Table 1's), 3 init
seeds each, in under 5 minutes on 2 CPU cores.

1. The whole measurement, as ``python -m gradflow trainability table1 table2`` runs it
   (:func:`gradflow.trainability.measure_variants`, its defaults: width 0.5, 2 steps of 8 inputs and
   their moved copies): wall time and this process's CPU time.
2. The baseline in the same run: one plain forward+backward per (variant, seed, batch) on the same
   16-image batches (cross-entropy, weight gradients off as in the measurement, no tracer), so the
   ratio says what tracing, the direct/residual split, the Jacobian probes and the fits cost.

    nice -n 19 python benchmarks/trainability_bench.py                  # all 25 variants, 3 seeds
    python benchmarks/trainability_bench.py --tables table2 --seeds 1   # a quick look
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def plain(vs, seeds: int, width: float, batch_size: int, batches: int) -> float:
    """Seconds of plain forward+backward steps on the measurement's paired batches."""
    from gradflow.probe.models import build_model
    from gradflow.trainability.measure import inputs
    from gradflow.trainability.predictors import EPS, paired_batch
    total = 0.0
    for v in vs:
        for s in range(seeds):
            m = build_model(v.model, dict(v.options, width=width), s).module.train()
            for p in m.parameters():
                p.requires_grad_(False)
            gen = torch.Generator().manual_seed(s)
            for x, y in inputs(s, batch_size, batches):
                xb, yb = paired_batch(x, y % 10, EPS, gen)
                xb.requires_grad_()
                t0 = time.perf_counter()
                F.cross_entropy(m(xb), yb).backward()
                total += time.perf_counter() - t0
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tables", default="table1,table2")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from gradflow.trainability import measure_variants, variants
    vs = variants(args.tables.split(","))
    print(f"{len(vs)} variants x {args.seeds} seeds, width {args.width}, {args.batches} x "
          f"{args.batch_size} inputs (+ moved copies), torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    c0, t0 = cpu_s(), time.perf_counter()
    table = measure_variants(vs, args.seeds, args.width, args.batch_size, args.batches, log=lambda m: None)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    c1, t1 = cpu_s(), time.perf_counter()
    base = plain(vs, args.seeds, args.width, args.batch_size, args.batches)
    base_wall, base_cpu = time.perf_counter() - t1, cpu_s() - c1
    print(f"predictors: {wall:.1f} s wall, {cpu:.1f} s CPU (target: < 300 s wall on 2 cores); "
          f"{len(table)} (variant, seed) rows, {table['seconds'].sum():.1f} s inside the traced steps")
    print(f"baseline, plain forward+backward on the same batches (models built too): {base:.1f} s in the "
          f"steps, {base_wall:.1f} s wall, {base_cpu:.1f} s CPU")
    print(f"ratio, predictors' traced steps / plain steps: {table['seconds'].sum() / base:.2f}x; "
          f"whole measurement / whole baseline (CPU): {cpu / base_cpu:.2f}x; "
          f"load average {os.getloadavg()[0]:.2f} at the end (other processes share these cores)")


if __name__ == "__main__":
    main()
