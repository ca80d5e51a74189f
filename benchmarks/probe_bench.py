"""How fast is ``python -m gradflow.probe``? Wall time, and the traced step against a plain one.

1. Wall time of ``python -m gradflow.probe --model resnet1001`` at its default batch
   size, in a fresh process (imports, build, step, report, files, figure).
2. In one process, on the same resnet1001 and batch: a plain forward+backward
   (cross-entropy, weight gradients on, as in training) against the probe's
   traced step (tracer with the direct/residual split, weights frozen as the probe
   runs, tables and summary included), and the traced step with weight gradients
   on. Interleaved, median of ``--repeats``.
3. Where the wall time of the real command goes, in a fresh process: the
   interpreter, ``import torch``, gradflow and the probe's modules, build, the
   traced step, tables and summary, report, the files, the figure (drawn, then
   saved), and the imports each phase pays on first use (pandas, matplotlib,
   scipy, sympy: ``torch.autograd.grad`` imports it the first time it is given
   grad_outputs). Each phase is timed by wrapping the function the command calls
   (``--phases-only`` runs just this).
4. Wall time of ``--compare table1`` on resnet110 (all ten Table 1 variants).

Ratios, not seconds, are what carry from one machine to the next, and from a
busy hour to a quiet one: the wall time of the probe is printed beside a
plain forward+backward of the same network measured in the same run
(``probe / plain step``). On a shared machine, read the ratio and the shares.

Every traced step here is :func:`gradflow.probe.trace_once`, the function the
probe and the figures call.

    python benchmarks/probe_bench.py                 # targets: <= 7 s wall, <= 1.3x (2 CPU cores)
    python benchmarks/probe_bench.py --repeats 5 --skip-compare
    python benchmarks/probe_bench.py --phases-only --threads 1      # a busy machine: where the time goes
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


# Runs ``python -m gradflow.probe ARGS`` in this (fresh) process with the phases' functions wrapped
# in timers; writes {"phases": {name: s}, "since_start": s} as JSON to the path in GRADFLOW_PHASES.
DRIVER = r"""
import json, os, sys, time
t_start = time.perf_counter()
phases = {}
def lap(name, t0):
    phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
t0 = time.perf_counter(); import torch; lap("import torch", t0)
t0 = time.perf_counter(); import gradflow; lap("import gradflow", t0)
t0 = time.perf_counter()
import gradflow.cli.probe as cli
import gradflow.probe as gp
import gradflow.probe.output as output
import gradflow.probe.run as run
lap("import the probe", t0)

def timed(name, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            lap(name, t0)
    return wrapper

run.build_model = timed("build", run.build_model)
run.trace_once = timed("traced step", run.trace_once)
run.probe_model = timed("probe_model", run.probe_model)     # traced step + tables and summary
gp.report_dict = timed("report", gp.report_dict)
gp.format_report = timed("report", gp.format_report)
run.ProbeResult.figure = timed("figure: draw", run.ProbeResult.figure)
_write = output.atomic_write
def atomic_write(path, write):
    name = "figure: save png" if str(path).endswith(".png") else "files: csv and json"
    return timed(name, _write)(path, write)
output.atomic_write = atomic_write
t0 = time.perf_counter()
code = cli.main(sys.argv[1:])
lap("the command", t0)
phases["tables and summary"] = phases.pop("probe_model") - phases["traced step"]
with open(os.environ["GRADFLOW_PHASES"], "w") as f:
    json.dump({"phases": phases, "since_start": time.perf_counter() - t_start, "code": code}, f)
"""

IMPORTS = ("torch", "numpy", "pandas", "matplotlib", "scipy", "seaborn", "sympy", "PIL", "tqdm")


def where_time_goes(model_name: str) -> dict:
    """Seconds per phase of ``python -m gradflow.probe --model M`` in a fresh process, and its imports.

    Two fresh processes: one timed plainly (phases, wall), one under ``-X importtime``
    (which slows imports a little) for what each third-party package costs to import.
    """
    import json
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, GRADFLOW_PHASES=os.path.join(out, "phases.json"))
        args = ["--model", model_name, "--no-progress", "--out", os.path.join(out, "probe")]
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", DRIVER, *args], capture_output=True, text=True, cwd=ROOT, env=env)
        wall_s = time.perf_counter() - t0
        if r.returncode:
            raise SystemExit(f"probe failed: {r.stderr}")
        with open(env["GRADFLOW_PHASES"]) as f:
            got = json.load(f)
        r = subprocess.run([sys.executable, "-X", "importtime", "-c", DRIVER, *args], capture_output=True,
                           text=True, cwd=ROOT, env=env)
    ph = got["phases"]
    inside = ph.pop("the command")
    ph["rest of the command (config, output folder, printing)"] = inside - sum(
        v for k, v in ph.items() if not k.startswith("import"))
    ph["interpreter start and exit"] = wall_s - got["since_start"]
    return dict(wall=wall_s, phases=ph, imports=_import_times(r.stderr))


def _import_times(stderr: str) -> dict:
    """Cumulative import time (s) of each package in IMPORTS, where it is first imported."""
    import re
    found: dict = {}
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)$", line)
        if m and m[3] in IMPORTS and m[3] not in found:
            found[m[3]] = int(m[1]) / 1e6
    return found


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
    p.add_argument("--phases-only", action="store_true", help="only where the wall time goes (3.)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads here and in the probe's processes (default: torch's own, one per "
                        "core); on a busy machine --threads 1 keeps two spinning threads from multiplying "
                        "the step's time")
    a = p.parse_args()
    if a.threads is not None:
        torch.set_num_threads(a.threads)
        os.environ["OMP_NUM_THREADS"] = str(a.threads)   # the fresh processes below
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} (the machine is quiet below ~0.5 per core)")
    w = where_time_goes(a.model)
    print(f"where the wall time of python -m gradflow.probe --model {a.model} goes "
          f"({w['wall']:.2f} s wall, target <= 7 s on 2 cores):")
    for k, v in w["phases"].items():
        print(f"  {k:<55} {v:6.2f} s  {100 * v / w['wall']:5.1f}%")
    print("  imports paid inside those phases and above (-X importtime, cumulative): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in w["imports"].items()))
    if a.phases_only:
        return
    t = wall(["--model", a.model])
    print(f"probe wall time, {a.model} defaults: {t:.1f} s (target <= 7 s on 2 cores)")
    ph = phases(a.model)
    print("in-process phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in ph.items()))
    r = step_ratio(a.model, a.repeats)
    print(f"probe wall time / plain fwd+bwd (same run): {t / r['plain_s']:.2f}x")
    print(f"{a.model} batch {r['batch']}: plain fwd+bwd {r['plain_s']:.2f} s, probe step {r['probe_step_s']:.2f} s "
          f"-> {r['ratio']:.2f}x (target <= 1.3x); traced with weight grads "
          f"{r['traced_with_weight_grads_s']:.2f} s -> {r['ratio_with_weight_grads']:.2f}x")
    if not a.skip_compare:
        t = wall(["--model", "resnet110", "--compare", "table1"])
        print(f"--compare table1 on resnet110 (10 variants): {t:.1f} s")


if __name__ == "__main__":
    main()
