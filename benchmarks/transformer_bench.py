"""Cost of tracing a transformer, as ratios against the same model's plain step, in one run.

The benchmark case: a 12-layer, 256-wide GPT (gradflow's ``gpt-small``, 24 residual
units) at sequence 128, batch 8, on the CPU; and, for comparison, a Hugging Face
GPT-2 of the same size built from a config (no download) when transformers is
installed. A step is forward, next-token cross-entropy, backward. Modes, timed
interleaved and repeated (median):

- ``plain``: no tracer.
- ``stats``: traced, statistics only (``split=False``).
- ``split``: traced with the direct/residual split of every unit.

The tracer stays attached across the timed steps, as in training (``with
gradflow.trace(model)`` around the loop): three copies of the model, one per
mode, are stepped in turn so that load on a shared machine hits every mode
alike; each traced step reads the tables (``tr.units``). Its one-time costs (finding units, checking every
block's parts against its own forward on the first call) fall in the warm-up
step and are reported separately as ``first_traced_step_s``.

    python benchmarks/transformer_bench.py                 # gpt-small and hf:gpt2, target split <= 1.2x
    python benchmarks/transformer_bench.py --models gpt-small --repeats 3 --units pre_ln post_ln
    python benchmarks/transformer_bench.py --threads 1 --clock cpu   # on a machine other jobs share
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

MODES = ("plain", "stats", "split")
TARGET_SPLIT = 1.2


def build(name: str, unit: str, layers: int, width: int, seq: int, vocab: int, device: str):
    import gradflow
    torch.manual_seed(0)
    if name == "hf:gpt2":
        import transformers
        cfg = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=4, n_positions=seq, vocab_size=vocab,
                                      bos_token_id=0, eos_token_id=0, use_cache=False)
        return transformers.GPT2LMHeadModel(cfg).to(device)
    return gradflow.create_model(name, unit=unit, n_layer=layers, d_model=width, seq_len=seq,
                                 vocab_size=vocab).to(device)


def logits_of(model, idx):
    out = model(idx)
    return out.logits if hasattr(out, "logits") else out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_modes(model, idx, targets, repeats: int, device: str, clock=time.perf_counter) -> dict:
    """Median seconds per step for each mode; three copies of the model, one per mode, stepped in turn."""
    import copy

    import gradflow
    models = {m: model if m == "plain" else copy.deepcopy(model) for m in MODES}
    tracers = {m: gradflow.trace(models[m], split=(m == "split")).attach() for m in MODES if m != "plain"}
    times = {m: [] for m in MODES}
    first = {}
    try:
        for r in range(repeats + 1):       # round 0 warms up (and pays the tracers' one-time costs)
            for m in MODES:
                mod = models[m]
                sync(device)
                t0 = clock()
                mod.zero_grad(set_to_none=True)
                F.cross_entropy(logits_of(mod, idx).flatten(0, 1), targets.flatten()).backward()
                if m in tracers:
                    tracers[m].units       # the step's tables are part of the cost
                sync(device)
                dt = clock() - t0
                if r == 0:
                    first[m] = dt
                else:
                    times[m].append(dt)
    finally:
        for tr in tracers.values():
            tr.detach()
    out = {m: statistics.median(v) for m, v in times.items()}
    out["first_traced_step_s"] = first["split"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt-small", "hf:gpt2"])
    p.add_argument("--units", nargs="+", default=["pre_ln"], help="zoo unit types to time (gpt-* only)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (with --threads 1, steady on a "
                        "machine other jobs share)")
    p.add_argument("--json", help="also write the results to this JSON file")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads or max(1, os.cpu_count() or 1))
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(a.device)
    targets = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(a.device)
    print(f"device={a.device} threads={torch.get_num_threads()} clock={a.clock} layers={a.layers} width={a.width} "
          f"seq={a.seq} batch={a.batch} repeats={a.repeats} torch={torch.__version__}")
    print(f"{'model':22s} {'plain s':>8s} {'stats x':>8s} {'split x':>8s} {'first traced s':>15s}")
    rows, ok = [], True
    for name in a.models:
        for unit in (a.units if name.startswith("gpt") else ["(its own)"]):
            try:
                model = build(name, unit, a.layers, a.width, a.seq, a.vocab, a.device)
            except ImportError as e:
                print(f"{name:22s} skipped: {e}")
                continue
            t = time_modes(model, idx, targets, a.repeats, a.device,
                           time.process_time if a.clock == "cpu" else time.perf_counter)
            row = dict(model=name, unit=unit, device=a.device, threads=torch.get_num_threads(), clock=a.clock,
                       batch=a.batch,
                       seq=a.seq, layers=a.layers, width=a.width, time_plain_s=t["plain"],
                       time_stats_ratio=t["stats"] / t["plain"], time_split_ratio=t["split"] / t["plain"],
                       first_traced_step_s=t["first_traced_step_s"])
            rows.append(row)
            label = f"{name} {unit}" if name.startswith("gpt") else name
            verdict = "ok" if row["time_split_ratio"] <= TARGET_SPLIT else f"ABOVE the {TARGET_SPLIT}x target"
            ok &= row["time_split_ratio"] <= TARGET_SPLIT
            print(f"{label:22s} {t['plain']:8.3f} {row['time_stats_ratio']:8.3f} {row['time_split_ratio']:8.3f} "
                  f"{t['first_traced_step_s']:15.3f}  {verdict}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
