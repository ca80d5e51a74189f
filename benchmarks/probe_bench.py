"""How fast is ``python -m gradflow.probe``? Wall time, and the traced step against a plain one.

1. Wall time of ``python -m gradflow.probe --model resnet1001`` at its default batch
   size, in a fresh process (imports, build, step, report, files, figure).
2. In one process, on the same resnet1001 and batch: a plain forward+backward
   (cross-entropy, weight gradients on, as in training) against the probe's
   traced step (tracer with the direct/residual split, weights frozen as the probe
   runs, tables and summary included), and the traced step with weight gradients
   on. Interleaved, median of ``--repeats``.
3. Wall time of ``--compare table1`` on resnet110 (all ten Table 1 variants).

    python benchmarks/probe_bench.py                 # targets: < 20 s, <= 1.3x (2 CPU cores)
    python benchmarks/probe_bench.py --repeats 5 --skip-compare
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wall(args: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "gradflow.probe", "--no-progress", *args, "--out", out],
                           capture_output=True, text=True, cwd=ROOT)
        dt = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"probe failed: {r.stderr}")
    return dt


def step_ratio(model_name: str, repeats: int) -> dict:
    import gradflow
    from gradflow.probing import build_model, synthetic
    from gradflow.probing.run import DEFAULT_BATCH_32, traced_step
    model = build_model(model_name, {}, seed=0).module.train()
    (x, y), = synthetic(DEFAULT_BATCH_32, 1, 32, seed=0)

    def plain():
        for p in model.parameters():
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y % 10).backward()

    def traced(weights: bool):
        def run():
            for p in model.parameters():
                p.requires_grad_(weights)
            model.zero_grad(set_to_none=True)
            with gradflow.trace(model) as tr:
                traced_step(model, x, y, synthetic_labels=True)
            tr.summary()
        return run

    fns = {"plain": plain, "probe_step": traced(False), "traced_with_weight_grads": traced(True)}
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(batch=DEFAULT_BATCH_32, **{f"{k}_s": v for k, v in med.items()},
                ratio=med["probe_step"] / med["plain"],
                ratio_with_weight_grads=med["traced_with_weight_grads"] / med["plain"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet1001")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-compare", action="store_true")
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    t = wall(["--model", a.model])
    print(f"probe wall time, {a.model} defaults: {t:.1f} s (target < 20 s)")
    r = step_ratio(a.model, a.repeats)
    print(f"{a.model} batch {r['batch']}: plain fwd+bwd {r['plain_s']:.2f} s, probe step {r['probe_step_s']:.2f} s "
          f"-> {r['ratio']:.2f}x (target <= 1.3x); traced with weight grads "
          f"{r['traced_with_weight_grads_s']:.2f} s -> {r['ratio_with_weight_grads']:.2f}x")
    if not a.skip_compare:
        t = wall(["--model", "resnet110", "--compare", "table1"])
        print(f"--compare table1 on resnet110 (10 variants): {t:.1f} s")


if __name__ == "__main__":
    main()
