"""How fast is ``python -m gradflow.probe``? Wall time, and the traced step against a plain one.

1. Wall time of ``python -m gradflow.probe --model resnet1001`` at its default batch
   size, in a fresh process (imports, build, step, report, files, figure).
2. In one process, on the same resnet1001 and batch: a plain forward+backward
   (cross-entropy, weight gradients on, as in training) against the probe's
   traced step (tracer with the direct/residual split, weights frozen as the probe
   runs, tables and summary included), and the traced step with weight gradients
   on. Interleaved, median of ``--repeats``.
3. The default probe's phases in one process: build, traced step, tables and
   summary, report, files, figure (where the wall time goes besides imports).
4. Wall time of ``--compare table1`` on resnet110 (all ten Table 1 variants).

Every traced step here is :func:`gradflow.probe.trace_once`, the function the
probe and the figures call.

    python benchmarks/probe_bench.py                 # targets: <= 7 s wall, <= 1.3x (2 CPU cores)
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
    from gradflow.probe import build_model, synthetic, trace_once
    from gradflow.probe.run import DEFAULT_BATCH_32
    model = build_model(model_name, {}, seed=0).module.train()
    inputs = synthetic(DEFAULT_BATCH_32, 1, 32, seed=0)
    (x, y), = inputs

    def plain():
        for p in model.parameters():
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y % 10).backward()

    def traced(weights: bool):
        def run():
            model.zero_grad(set_to_none=True)
            trace_once(model, inputs, seed=0, weight_grads=weights).tracer.summary()
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


def phases(model_name: str) -> dict:
    """Seconds per phase of the default probe, in this process (imports already paid)."""
    import matplotlib
    matplotlib.use("Agg")
    from gradflow.probe import ProbeConfig, report_dict, run_probe, write_outputs
    t0 = time.perf_counter()
    res = run_probe(ProbeConfig(model=model_name, progress=False, device="cpu"))
    total = time.perf_counter() - t0
    v = next(iter(res.variants.values())).timings
    t0 = time.perf_counter()
    rep = report_dict(res)
    report_s = time.perf_counter() - t0
    from pathlib import Path
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        write_outputs(res, rep, Path(out))
        files_s = time.perf_counter() - t0
    return dict(build=v["build"], step=sum(v["steps"]), tables=v["tables"], run_probe=total, report=report_s,
                files_and_figure=files_s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet1001")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-compare", action="store_true")
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    t = wall(["--model", a.model])
    print(f"probe wall time, {a.model} defaults: {t:.1f} s (target <= 7 s on 2 cores)")
    ph = phases(a.model)
    print("in-process phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in ph.items()))
    r = step_ratio(a.model, a.repeats)
    print(f"{a.model} batch {r['batch']}: plain fwd+bwd {r['plain_s']:.2f} s, probe step {r['probe_step_s']:.2f} s "
          f"-> {r['ratio']:.2f}x (target <= 1.3x); traced with weight grads "
          f"{r['traced_with_weight_grads_s']:.2f} s -> {r['ratio_with_weight_grads']:.2f}x")
    if not a.skip_compare:
        t = wall(["--model", "resnet110", "--compare", "table1"])
        print(f"--compare table1 on resnet110 (10 variants): {t:.1f} s")


if __name__ == "__main__":
    main()
