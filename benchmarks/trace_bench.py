"""Cost of tracing, as ratios against the same model's plain forward+backward.

For each model: time of one training step (forward, cross-entropy, backward)
plain, traced with statistics only (``split=False``), traced with the full
direct/residual split (``split=True``), and (``--tensorboard``) the split with
every step streamed to TensorBoard; interleaved and repeated (median). Each
traced mode keeps one trace attached across its steps, as a training loop
does (the parts check runs once, at the warm-up step); the cost of a step
includes writing the previous step's rows (its DataFrames are built when read;
the TensorBoard mode builds them every step). The memory a step adds is
measured in a fresh subprocess per mode (peak RSS over the step on CPU, with
glibc's mmap threshold fixed so that it is the peak of the live tensors;
``torch.cuda.max_memory_allocated`` on CUDA).

    python benchmarks/trace_bench.py                       # resnet164, resnet1001, torchvision resnet50
    python benchmarks/trace_bench.py --models resnet20 --batch 16 --repeats 3
    python benchmarks/trace_bench.py --models hf:gpt_neox timm:vit_tiny_patch16_224 --batch 4

``hf:<arch>`` is a Hugging Face decoder from a config (12 layers, d=256, sequence 128;
GPT-NeoX has no adapter, so its units are found as it runs), ``timm:<name>`` a timm
model (``pretrained=False``, 224x224). For the models in ``--discovery`` the one-off
discovery forward (:mod:`gradflow.tracing.runtime`) is timed against a plain forward
(goal: <= 3x).

Measured figures, on an idle machine (time ratios, peak-memory ratios from fresh
processes, and ``tb/split``, the TensorBoard sink's cost on resnet164)::

    python benchmarks/trace_bench.py --batch 16 --repeats 5 --threads 2 --tensorboard resnet164

The host's share: on a GPU, a deep network of small convolutions (resnet1001 on CIFAR)
runs as fast as the host launches its kernels, so the tracer's Python and launches per unit
set the ratio there. The CPU run at batch 1 on 8x8 images is bound the same way (its
kernels are tiny) and measures that share without a GPU::

    python benchmarks/trace_bench.py --models resnet1001 --batch 1 --image-size 8 --threads 1 --no-memory

On a shared machine add ``--clock cpu --threads 1`` (this process's CPU time): the
ratios then move by a few percent from run to run (caches and memory bandwidth are
shared); ``--no-memory`` / ``--no-time`` run one half. The time columns are medians.

Targets (CPU, batch 16): statistics <= 1.05x time, split <= 1.15x,
peak memory <= 1.05x; streaming to TensorBoard every step adds <= 5% on resnet164.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

try:
    import gradflow  # noqa: F401
except ImportError:   # run from a checkout without installing it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("plain", "stats", "split")
TB_MODE = "split_tb"


def build(name: str, device: str):
    """The model and its default input size (image side, or sequence length for ``hf:``)."""
    import gradflow
    torch.manual_seed(0)
    if name.startswith("torchvision:"):
        import torchvision
        return getattr(torchvision.models, name.split(":", 1)[1])(num_classes=10).to(device), 160
    if name.startswith("timm:"):
        import timm
        return timm.create_model(name.split(":", 1)[1], pretrained=False, num_classes=10).to(device), 224
    if name.startswith("hf:"):
        return HFDecoder(name.split(":", 1)[1]).to(device), 128
    return gradflow.create_model(name).to(device), 32


class HFDecoder(torch.nn.Module):
    """A Hugging Face decoder from a config (12 layers, d=256), classifying from its last token.

    GPT-NeoX by default: no adapter knows it, so its units are found as it runs.
    """

    def __init__(self, arch: str = "gpt_neox"):
        super().__init__()
        import transformers
        transformers.logging.set_verbosity_error()
        cfg = transformers.AutoConfig.for_model(arch, hidden_size=256, num_hidden_layers=12, num_attention_heads=4,
                                                intermediate_size=1024, vocab_size=1000, max_position_embeddings=512)
        self.body = transformers.AutoModel.from_config(cfg)
        self.head = torch.nn.Linear(256, 10)

    def forward(self, ids):
        return self.head(self.body(input_ids=ids).last_hidden_state[:, -1])


def inputs(name: str, batch: int, size: int, device: str):
    """A batch for ``name``: images, or token ids of length ``size`` for ``hf:``; and labels."""
    if name.startswith("hf:"):
        x = torch.randint(0, 1000, (batch, size), device=device)
    else:
        x = torch.randn(batch, 3, size, size, device=device)
    return x, torch.randint(0, 10, (batch,), device=device)


def discovery_ratio(name: str, batch: int, repeats: int, device: str, clock=time.perf_counter,
                    image_size: int = 0) -> float:
    """The one-off discovery forward (units found as the network runs) over a plain forward."""
    from gradflow.tracing.watch import discover
    model, size = build(name, device)
    x, _ = inputs(name, batch, image_size or size, device)
    plain, disc = [], []
    model(x)
    for _ in range(repeats):
        sync(device)
        t0 = clock()
        model(x)
        sync(device)
        plain.append(clock() - t0)
        t0 = clock()
        discover(model, (x,), {})
        sync(device)
        disc.append(clock() - t0)
    return statistics.median(disc) / statistics.median(plain)


class Stepper:
    """One mode's training step; a traced mode keeps its trace attached across steps."""

    def __init__(self, model, x, y, mode: str, log_dir: str = ""):
        import gradflow
        self.model, self.x, self.y, self.mode = model, x, y, mode
        self.tr = None
        if mode != "plain":
            sinks = []
            if mode == TB_MODE:
                from gradflow.tracing import TensorBoardSink
                sinks = [TensorBoardSink(log_dir=log_dir)]
            self.tr = gradflow.trace(model, split=(mode != "stats"), sinks=sinks, history=1)

    def __call__(self):
        if self.tr is not None and not self.tr._attached:
            self.tr.attach()
        self.model.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.y).backward()

    def pause(self):
        """Detach (writing the last step's tables): another mode's steps come next."""
        if self.tr is not None:
            self.tr.detach()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_modes(name: str, batch: int, repeats: int, device: str, modes, log_dir: str,
               clock=time.perf_counter, image_size: int = 0, gc_steps: int = 16) -> dict:
    """Seconds per step of each mode, full garbage collections counted at their steady rate.

    Python's full (generation 2) collection walks every object of the process: about
    300,000 for a resnet1001, 0.1 s here. It comes when enough objects have outlived two
    younger collections; a traced step keeps its records until its rows are written, so a
    trace attached across a training loop brings one every several steps. Re-attaching
    between the interleaved modes would bring more, and at random places: so each timed
    pair starts from a collected heap and leaves out any full collection inside it, and
    each mode's full collections are measured on their own, in ``gc_steps`` steps run in
    a row with its trace attached (as in training), and added back per step.
    """
    model, size = build(name, device)
    x, y = inputs(name, batch, image_size or size, device)
    steps = {m: Stepper(model, x, y, m, log_dir) for m in modes}
    times = {m: [] for m in modes}
    for m in modes:  # warm up (the traced modes check their parts here)
        steps[m]()
        steps[m]()
        steps[m].pause()
    full = GcClock(clock)
    for _ in range(repeats):
        for m in modes:
            st = steps[m]
            st()                        # the first step after re-attaching is not timed
            sync(device)
            gc.collect()
            full.reset()
            t0 = clock()
            st()
            st()
            sync(device)
            times[m].append((clock() - t0 - full.seconds) / 2)
            st.pause()
    out = {m: statistics.median(v) for m, v in times.items()}
    for m in modes:                     # the full collections of a loop with the trace attached
        st = steps[m]
        st()
        gc.collect()
        full.reset()
        for _ in range(gc_steps):
            st()
        sync(device)
        out[f"gc_{m}"] = full.seconds / gc_steps
        out[m] += out[f"gc_{m}"]
        st.pause()
    full.close()
    return out


class GcClock:
    """Time spent in Python's full (generation 2) garbage collections since ``reset()``."""

    def __init__(self, clock=time.perf_counter):
        self.clock, self.seconds, self._t0 = clock, 0.0, None
        gc.callbacks.append(self._cb)

    def reset(self) -> None:
        self.seconds, self._t0 = 0.0, None

    def _cb(self, phase, info) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._t0 = self.clock()
        elif self._t0 is not None:
            self.seconds += self.clock() - self._t0
            self._t0 = None

    def close(self) -> None:
        gc.callbacks.remove(self._cb)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(name: str, batch: int, mode: str, device: str, image_size: int = 0) -> int:
    """Bytes one step of ``mode`` adds on top of the built model (run in a fresh process)."""
    model, size = build(name, device)
    x, y = inputs(name, batch, image_size or size, device)
    st = Stepper(model, x[:1], y[:1], mode, "")
    st()                                     # kernels loaded, parts checked, at batch 1
    st.x, st.y = x, y                        # the same trace goes on, as in training
    model.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        st()
        st.pause()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _rss_bytes()
    st()
    st.pause()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


# On the CPU, glibc hands tensors above a moving threshold back to the OS only sometimes, and
# reuses what it kept: the peak RSS of a step then depends on what ran before it in the
# process. A fixed threshold (every block of 64 KiB or more is its own mapping, returned when
# freed) makes the peak RSS the peak of the live tensors, the quantity compared here.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def memory_modes(name: str, batch: int, device: str, image_size: int = 0) -> dict:
    out = {}
    env = dict(os.environ, **MALLOC_ENV, OMP_NUM_THREADS=str(torch.get_num_threads()))
    for m in MODES:
        cmd = [sys.executable, __file__, "--child", name, str(batch), m, device, str(image_size)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        out[m] = int(res.stdout.strip().splitlines()[-1])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet164", "resnet1001", "torchvision:resnet50"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=0,
                   help="input height and width (0: the model's own, 32 for the zoo, 160 for torchvision)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gc-steps", type=int, default=16,
                   help="steps in a row per mode that measure its full garbage collections")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--no-time", action="store_true", help="only the peak-memory children")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="cpu: this process's CPU time (steadier on a shared machine; CPU only)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: as many as cores)")
    p.add_argument("--tensorboard", nargs="*", default=["resnet164"],
                   help="models also timed with the split streamed to TensorBoard every step")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--discovery", nargs="*", default=["hf:gpt_neox", "timm:vit_tiny_patch16_224"],
                   help="models whose one-off discovery forward is also timed, against a plain forward")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        name, batch, mode, device, image_size = a.child
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
        print(memory_child(name, int(batch), mode, device, int(image_size)))
        return 0
    if a.image_size < 0 or a.batch < 1 or a.gc_steps < 1 or a.repeats < 1:
        p.error(f"--batch {a.batch} --image-size {a.image_size} --repeats {a.repeats} --gc-steps "
                f"{a.gc_steps}: give a batch, repeats and gc steps of 1 or more, and an image size "
                "of 1 or more (0: the model's own)")
    torch.set_num_threads(a.threads or max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    rows = []
    print(f"device={a.device} batch={a.batch} image_size={a.image_size or 'own'} repeats={a.repeats} clock={a.clock} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} load={os.getloadavg()[0]:.1f}")
    print(f"{'model':24s} {'plain s':>8s} {'stats x':>8s} {'split x':>8s} {'mem plain MB':>13s} "
          f"{'stats x':>8s} {'split x':>8s} {'tb/split':>9s}  full gc ms/step plain/stats/split")
    import tempfile
    for name in a.models:
        modes = MODES + ((TB_MODE,) if name in a.tensorboard else ())
        with tempfile.TemporaryDirectory() as log_dir:
            t = {m: float("nan") for m in modes} if a.no_time else \
                time_modes(name, a.batch, a.repeats, a.device, modes, log_dir, CLOCKS[a.clock], a.image_size,
                           a.gc_steps)
        mem = {} if a.no_memory else memory_modes(name, a.batch, a.device, a.image_size)
        row = {"model": name, "batch": a.batch, "image_size": a.image_size, "device": a.device,
               "time_plain_s": t["plain"], "time_stats_ratio": t["stats"] / t["plain"],
               "time_split_ratio": t["split"] / t["plain"]}
        if TB_MODE in t:
            row["time_tb_over_split"] = t[TB_MODE] / t["split"]
        row.update({k: v for k, v in t.items() if k.startswith("gc_")})
        if mem:
            row.update(mem_plain_mb=mem["plain"] / 2**20, mem_stats_ratio=mem["stats"] / mem["plain"],
                       mem_split_ratio=mem["split"] / mem["plain"])
        if name in a.discovery and not a.no_time:
            row["discovery_over_forward"] = discovery_ratio(name, a.batch, a.repeats, a.device, CLOCKS[a.clock],
                                                            a.image_size)
        rows.append(row)
        print(f"{name:24s} {t['plain']:8.3f} {row['time_stats_ratio']:8.3f} {row['time_split_ratio']:8.3f} "
              + (f"{row['mem_plain_mb']:13.1f} {row['mem_stats_ratio']:8.3f} {row['mem_split_ratio']:8.3f}"
                 if mem else f"{'':13s} {'':8s} {'':8s}")
              + (f" {row['time_tb_over_split']:9.3f}" if TB_MODE in t else f" {'':9s}")
              + ("" if a.no_time else "  " + "/".join(f"{1e3 * t['gc_' + m]:.0f}" for m in MODES))
              + (f"  discovery {row['discovery_over_forward']:.2f}x a forward" if "discovery_over_forward" in row
                 else ""), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
