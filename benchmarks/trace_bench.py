"""Cost of tracing, as ratios against the same model's plain forward+backward.

For each model: time of one training step (forward, cross-entropy, backward)
plain, traced with statistics only (``split=False``), and traced with the full
direct/residual split (``split=True``), interleaved and repeated (median); and
the memory a step adds, each mode in a fresh subprocess (peak RSS over the
step on CPU, ``torch.cuda.max_memory_allocated`` on CUDA).

    python benchmarks/trace_bench.py                       # resnet164, resnet1001, torchvision resnet50
    python benchmarks/trace_bench.py --models resnet20 --batch 16 --repeats 3

Targets (issues 3 and 4): statistics <= 1.10x time and <= 1.1x memory; full
split <= 1.3x on zoo models and <= 2.5x on third-party models.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

MODES = ("plain", "stats", "split")


def build(name: str, device: str):
    import gradflow
    torch.manual_seed(0)
    if name.startswith("torchvision:"):
        import torchvision
        return getattr(torchvision.models, name.split(":", 1)[1])(num_classes=10).to(device), 160
    return gradflow.create_model(name).to(device), 32


def step_fn(model, x, y, mode: str):
    import gradflow

    def step():
        model.zero_grad(set_to_none=True)
        if mode == "plain":
            F.cross_entropy(model(x), y).backward()
            return
        with gradflow.trace(model, split=(mode == "split")) as tr:
            F.cross_entropy(model(x), y).backward()
        tr.units  # the tables are part of the cost
    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_modes(name: str, batch: int, repeats: int, device: str) -> dict:
    model, size = build(name, device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    steps = {m: step_fn(model, x, y, m) for m in MODES}
    for m in MODES:  # warm up
        steps[m]()
    times = {m: [] for m in MODES}
    for _ in range(repeats):
        for m in MODES:
            sync(device)
            t0 = time.perf_counter()
            steps[m]()
            sync(device)
            times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(name: str, batch: int, mode: str, device: str) -> int:
    """Bytes one step of ``mode`` adds on top of the built model (run in a fresh process)."""
    model, size = build(name, device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    step_fn(model, x[:1], y[:1], "plain")()  # load kernels at batch 1
    model.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step_fn(model, x, y, mode)()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _rss_bytes()
    step_fn(model, x, y, mode)()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def memory_modes(name: str, batch: int, device: str) -> dict:
    out = {}
    for m in MODES:
        cmd = [sys.executable, __file__, "--child", name, str(batch), m, device]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[m] = int(res.stdout.strip().splitlines()[-1])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet164", "resnet1001", "torchvision:resnet50"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        name, batch, mode, device = a.child
        print(memory_child(name, int(batch), mode, device))
        return 0
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    rows = []
    print(f"device={a.device} batch={a.batch} repeats={a.repeats} torch={torch.__version__}")
    print(f"{'model':24s} {'plain s':>8s} {'stats x':>8s} {'split x':>8s} {'mem plain MB':>13s} {'stats x':>8s} {'split x':>8s}")
    for name in a.models:
        t = time_modes(name, a.batch, a.repeats, a.device)
        mem = {} if a.no_memory else memory_modes(name, a.batch, a.device)
        row = {"model": name, "batch": a.batch, "device": a.device,
               "time_plain_s": t["plain"], "time_stats_ratio": t["stats"] / t["plain"],
               "time_split_ratio": t["split"] / t["plain"]}
        if mem:
            row.update(mem_plain_mb=mem["plain"] / 2**20, mem_stats_ratio=mem["stats"] / mem["plain"],
                       mem_split_ratio=mem["split"] / mem["plain"])
        rows.append(row)
        print(f"{name:24s} {t['plain']:8.3f} {row['time_stats_ratio']:8.3f} {row['time_split_ratio']:8.3f} "
              + (f"{row['mem_plain_mb']:13.1f} {row['mem_stats_ratio']:8.3f} {row['mem_split_ratio']:8.3f}"
                 if mem else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
