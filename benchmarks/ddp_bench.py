"""Cost of tracing under DDP, as ratios against the same run's plain steps.

Two CPU processes (gloo, spawned here) train the same model on their own batches. Four
modes, interleaved round by round, each timed per step (median over the rounds' steps):

* ``ddp_plain``: ``DistributedDataParallel`` step (forward, cross-entropy, backward, SGD step);
* ``ddp_traced``: the same under ``gradflow.trace(model, optimizer=opt)``: every step's
  rows joined across the ranks (one ``all_gather`` per step, counted);
* ``local_plain`` / ``local_traced``: each process alone, no DDP wrapper, traced with
  ``gather=False``: the single-process tracer, timed beside the other two at the same
  load (both processes run it at once, as they run the DDP step).

The figure of merit is ``ddp_traced / ddp_plain`` against ``local_traced / local_plain``:
the gather should add at most 2% to the single-process tracer's overhead. Rank 0's
times are reported (each step starts at a barrier). Traces keep no history and have no
sinks, so what is timed is recording, packing and the collective; a sink costs the same
on rank 0 with or without DDP.

    python benchmarks/ddp_bench.py                                  # resnet20, 8 samples per rank
    nice -n 19 python benchmarks/ddp_bench.py --model resnet20 --batch 8 --rounds 5 --steps 4

On a shared machine the two processes compete with everything else for the cores:
the ratios move by a few percent from run to run; compare them within one run, and
try ``--clock cpu`` (rank 0's CPU time per step).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

try:
    import gradflow  # noqa: F401
except ImportError:   # run from a checkout without installing it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("ddp_plain", "ddp_traced", "local_plain", "local_traced")


def _rank(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import gradflow
    torch.manual_seed(0)
    model = gradflow.create_model(args.model)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict = {m: [] for m in MODES}
    collectives = []
    for r in range(args.rounds):
        for mode in MODES:
            runner = ddp if mode.startswith("ddp") else model
            tr = gradflow.trace(model, optimizer=opt, history=0, gather=mode == "ddp_traced") \
                if mode.endswith("traced") else None
            if tr is not None:
                tr.attach()
            try:
                for s in range(args.steps + 1):     # the first is a warm-up (the parts check)
                    dist.barrier()
                    t0 = clock()
                    F.cross_entropy(runner(x), y).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    dt = clock() - t0
                    if s:
                        times[mode].append(dt)
            finally:
                if tr is not None:
                    tr.detach()
                    if tr._ranks is not None:
                        collectives.append(tr._ranks.collectives / (args.steps + 1))
    if rank == 0:
        med = {m: statistics.median(v) for m, v in times.items()}
        ddp_ratio = med["ddp_traced"] / med["ddp_plain"]
        local_ratio = med["local_traced"] / med["local_plain"]
        res = dict(model=args.model, batch_per_rank=args.batch, world=world, threads=args.threads, clock=args.clock,
                   median_s={m: round(v, 5) for m, v in med.items()},
                   ddp_traced_over_plain=round(ddp_ratio, 4), local_traced_over_plain=round(local_ratio, 4),
                   difference=round(ddp_ratio - local_ratio, 4),
                   collectives_per_step=collectives, goal="difference <= 0.02")
        with open(out, "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=8, help="samples per rank")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="timed steps per mode and round")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time (less moved by other load; a rank waiting in "
                        "gloo is not counted)")
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        mp.spawn(_rank, args=(args.world, port, args, out), nprocs=args.world)
        with open(out) as f:
            res = json.load(f)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
