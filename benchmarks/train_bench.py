"""Training throughput and peak memory: gradflow's trainer path against a plain baseline.

For each model, in one run:

- ``baseline``  torchvision-style: Dataset of PIL images, per-image RandomCrop(32, 4),
                RandomHorizontalFlip, ToTensor, Normalize, a DataLoader, fp32, eager
- ``eager``     gradflow's data path (uint8 CIFAR on the device, batch augmentation), fp32
- ``eager_cl``  the same, channels_last (the trainer's default on cuda and cpu)
- ``bf16_cl``   the same with bf16 autocast and channels_last
- ``compiled``  bf16 + channels_last + torch.compile
- ``compiled_cl`` fp32 + channels_last + torch.compile (the laptop recipe's arithmetic, compiled)

Images/s count training images (forward, backward, SGD step, data included),
timed after warm-up steps, with the device synchronised. Peak memory is the
CUDA allocator's peak (not measured on CPU). The 200-epoch estimate is 200 x
50,000 images at the measured rate.

    python benchmarks/train_bench.py --models resnet20 --steps 10        # CPU
    python benchmarks/train_bench.py --models resnet110,resnet164 --width 0.5 \
        --modes eager,eager_cl --steps 8 --threads 1                    # CPU, laptop scale
    python benchmarks/train_bench.py --models resnet110 --width 0.5 \
        --modes eager_cl,compiled_cl --steps 8 --warmup 3 --threads 1   # CPU: does compile pay?
    python benchmarks/train_bench.py --models resnet110,resnet164 --width 0.5 \
        --eval-batches 128,500 --threads 1                               # the evaluation's batch
    python benchmarks/train_bench.py --models resnet110,resnet164,resnet1001  # GPU
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext

import torch

import gradflow
from gradflow.data.cifar import CifarArrays, DeviceCifar
from gradflow.training.loop import forward_backward

MODES = ("baseline", "eager", "eager_cl", "bf16_cl", "compiled", "compiled_cl")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _fake_cifar(n: int) -> CifarArrays:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return CifarArrays(x, y, x[:100], y[:100], 10)


def _baseline_batches(arrays: CifarArrays, batch: int, workers: int, dev: torch.device):
    from PIL import Image
    from torchvision import transforms as T

    class PilCifar(torch.utils.data.Dataset):
        def __init__(self):
            self.images = [Image.fromarray(a) for a in arrays.train_x.permute(0, 2, 3, 1).numpy()]
            self.labels = arrays.train_y.tolist()
            self.tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                 T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.tf(self.images[i]), self.labels[i]

    loader = torch.utils.data.DataLoader(PilCifar(), batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=dev.type == "cuda",
                                         persistent_workers=workers > 0)
    while True:
        for x, y in loader:
            yield x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)


def measure(model_name: str, mode: str, batch: int, warmup: int, steps: int, dev: torch.device,
            arrays: CifarArrays, workers: int, width: float = 1.0) -> dict:
    """Images/s and peak memory of ``steps`` training steps after ``warmup`` ones."""
    torch.manual_seed(0)
    model = gradflow.create_model(model_name, width=width).to(dev)
    fast = mode in ("bf16_cl", "compiled")
    nhwc = fast or mode in ("eager_cl", "compiled_cl")
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    runner = torch.compile(model) if mode in ("compiled", "compiled_cl") else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if fast else nullcontext
    if mode == "baseline":
        it = _baseline_batches(arrays, batch, workers, dev)
        next_batch = lambda i: next(it)  # noqa: E731
    else:
        data = DeviceCifar(arrays, dev)
        ipe = data.iters_per_epoch(batch)
        next_batch = lambda i: data.train_batch(i // ipe, i % ipe, batch)  # noqa: E731
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_compile = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(dev)
            t0 = time.perf_counter()
            warm_s = t0 - t_compile
        x, y = next_batch(i)
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        forward_backward(runner, opt, x, y, amp)
        opt.step()
    _sync(dev)
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    img_s = steps * batch / elapsed
    return dict(model=model_name, mode=mode, batch=batch, images_per_s=img_s, peak_gib=peak,
                warmup_s=warm_s, hours_200_epochs=200 * 50_000 / img_s / 3600)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet110,resnet164,resnet1001")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--images", type=int, default=50_000, help="size of the fake training set")
    p.add_argument("--workers", type=int, default=4, help="baseline DataLoader workers")
    p.add_argument("--width", type=float, default=1.0, help="the zoo's width multiplier (0.5: laptop scale)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eval-batches", default="",
                   help="instead: time the trainer's evaluation of a 1,017-image test set at these "
                        "batch sizes (e.g. 128,500; ratios against the first)")
    return p


def measure_eval(model_name: str, batches: list, dev: torch.device, width: float, repeats: int = 3) -> list:
    """Seconds per evaluation of a 1,017-image test set (the CPU subset's size) per batch size."""
    from contextlib import nullcontext
    from gradflow.training.distributed import Dist
    from gradflow.training.steps import evaluate
    arrays = _fake_cifar(1017)
    arrays = CifarArrays(arrays.train_x, arrays.train_y, arrays.train_x, arrays.train_y, 10)
    data = DeviceCifar(arrays, dev)
    torch.manual_seed(0)
    model = gradflow.create_model(model_name, width=width).to(dev, memory_format=torch.channels_last)
    out = []
    for b in batches:
        evaluate(model, data, Dist(0, 1, dev), nullcontext, True, b)       # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(repeats):
            evaluate(model, data, Dist(0, 1, dev), nullcontext, True, b)
        _sync(dev)
        out.append((time.perf_counter() - t0) / repeats)
    return out


def main(args: argparse.Namespace) -> int:
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.eval_batches:
        try:
            batches = [int(b) for b in args.eval_batches.split(",")]
            assert all(b > 0 for b in batches)
        except (ValueError, AssertionError):
            get_args_parser().error(f"--eval-batches {args.eval_batches!r}: give positive batch sizes, e.g. 128,500")
        print(f"device {dev}, width x{args.width}, {torch.get_num_threads()} threads: seconds per evaluation "
              f"of 1,017 test images at batch {', '.join(map(str, batches))} (ratio to the first)")
        for name in args.models.split(","):
            t = measure_eval(name, batches, dev, args.width)
            print(f"{name:11s} " + "  ".join(f"{b}: {s:.2f} s (x{s / t[0]:.2f})" for b, s in zip(batches, t)),
                  flush=True)
        return 0
    arrays = _fake_cifar(args.images)
    modes = args.modes.split(",")
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), "
          f"width x{args.width}, {torch.get_num_threads()} threads, batch {args.batch}, {args.steps} timed steps after {args.warmup}, torch {torch.__version__}")
    print(f"{'model':11s} {'mode':9s} {'images/s':>9s} {'x ' + modes[0]:>10s} {'peak GiB':>8s} "
          f"{'warm-up s':>9s} {'200 ep (h)':>10s}")
    for name in args.models.split(","):
        base = None
        for mode in modes:
            try:
                r = measure(name, mode, args.batch, args.warmup, args.steps, dev, arrays, args.workers,
                            args.width)
            except torch.cuda.OutOfMemoryError:
                print(f"{name:11s} {mode:9s} out of memory at batch {args.batch}", flush=True)
                torch.cuda.empty_cache()
                continue
            base = r["images_per_s"] if base is None else base  # ratios against the first mode
            ratio = f"{r['images_per_s'] / base:10.2f}" if base else f"{'-':>10s}"
            print(f"{name:11s} {mode:9s} {r['images_per_s']:9.0f} {ratio} {r['peak_gib']:8.2f} "
                  f"{r['warmup_s']:9.1f} {r['hours_200_epochs']:10.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
