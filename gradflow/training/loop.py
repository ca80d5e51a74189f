"""The trainer: ``train(config) -> run folder``. One process, or one of several under torchrun (DDP).

Results do not depend on the number of processes beyond BN batch statistics:
every process draws the same global batch (gradflow.data) and takes its equal
slice; DDP averages the gradients, which equals the single-process mean loss's
gradient. Test error is summed over shards of the test set.
"""
from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import DeviceCifar, load_cifar
from ..errors import GradflowError
from ..registry import create_model, model_options
from . import distributed
from .checkpoint import read_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig, make_config
from .presets import schedule
from .runlog import RunLog, append_probe, code_version, default_name, make_run_dir, write_json

# Fields a resumed run may change: where the data is and how it runs, not what it computes.
RESUMABLE = ("data", "download", "verify_data", "device", "progress", "halt_at", "compile", "out_dir")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or Inf. The last good checkpoint is kept."""


def resume_config(run: str | Path, **changes: Any) -> TrainConfig:
    """The saved config of ``run`` (a run folder or checkpoint), with RESUMABLE ``changes``."""
    bad = sorted(set(changes) - set(RESUMABLE))
    if bad:
        raise GradflowError(f"a resumed run keeps its recipe; cannot change {', '.join(bad)} "
                            f"(only {', '.join(RESUMABLE)}): start a new run instead")
    saved = read_checkpoint(run)["config"]
    return make_config(saved, **{"halt_at": None, **changes})


def _model_options(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    options = dict(cfg.model_options)
    if options.setdefault("num_classes", num_classes) != num_classes:
        raise GradflowError(f"num_classes={options['num_classes']} but {cfg.dataset} has {num_classes} "
                            f"classes: drop the num_classes option or pick the matching --dataset")
    return options


def _check_model(cfg: TrainConfig) -> None:
    """Unknown model names and options fail before any data is read."""
    allowed = model_options(cfg.model)
    bad = sorted(set(cfg.model_options) - set(allowed))
    if bad:
        raise GradflowError(f"model {cfg.model!r} takes no option {', '.join(map(repr, bad))}; "
                            f"its options are: {', '.join(sorted(allowed))}")


@contextmanager
def _backends(cfg: TrainConfig, dev: torch.device):
    """Deterministic kernels or cudnn autotuning for the run; the process's settings come back after."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(cfg.deterministic)
    torch.backends.cudnn.deterministic = cfg.deterministic
    torch.backends.cudnn.benchmark = not cfg.deterministic and dev.type == "cuda"
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:]


@contextmanager
def _stop_on_signals():
    """SIGINT/SIGTERM set a flag the loop checks (it saves, then exits); a second one interrupts."""
    hit: dict[str, Optional[str]] = {"sig": None}
    old = {}

    def handler(signum, frame):
        if hit["sig"] is not None:
            raise KeyboardInterrupt
        hit["sig"] = signal.Signals(signum).name

    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            old[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread: no graceful stop there
            pass
    try:
        yield hit
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _evaluate(runner: nn.Module, data: DeviceCifar, d: distributed.Dist, amp, channels_last: bool):
    """Test loss and error over the whole test set (summed over processes)."""
    was = runner.training
    runner.eval()
    acc = torch.zeros(3, device=d.device, dtype=torch.float64)  # loss sum, errors, count
    with torch.no_grad(), amp():
        for x, y in data.test_batches(500, d.rank, d.world):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = runner(x).float()
            acc += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                                (logits.argmax(1) != y).sum().double(), torch.tensor(len(y), device=d.device, dtype=torch.float64)])
    runner.train(was)
    loss, err, n = d.sum_(acc).tolist()
    return loss / max(n, 1), err / max(n, 1)


def forward_backward(runner: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                     y: torch.Tensor, amp=nullcontext):
    """Cross-entropy of one batch and its gradients (the caller steps): (loss, logits), on the device."""
    with amp():
        logits = runner(x)
    loss = F.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return loss, logits


def train(config: TrainConfig, resume: Optional[str | Path] = None) -> Path:
    """Train ``config`` (or continue the run at ``resume``) and return its run folder.

    Under torchrun each process calls this; only rank 0 writes files. Raises
    GradflowError on bad input and TrainingDiverged when the loss is NaN/Inf.
    """
    d = distributed.setup(config.device)
    try:
        with _backends(config, d.device):
            return _train(config, resume, d)
    finally:
        distributed.teardown()


def _train(cfg: TrainConfig, resume, d: distributed.Dist) -> Path:
    dev = d.device
    if cfg.batch_size % d.world:
        raise GradflowError(f"batch_size={cfg.batch_size} does not split over {d.world} processes: "
                            f"use a multiple of {d.world}")
    if cfg.sync_bn and d.world > 1 and dev.type != "cuda":
        raise GradflowError("--sync-bn needs CUDA devices (torch's SyncBatchNorm is GPU-only): "
                            "drop --sync-bn on CPU")
    if cfg.probe_every:
        from ..tracing import trace  # noqa: F401  (fail now, not at the first probe)
    use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and dev.type == "cuda")
    channels_last = cfg.channels_last if cfg.channels_last is not None else dev.type == "cuda"

    def amp():
        return torch.autocast(dev.type, dtype=torch.bfloat16) if use_amp else nullcontext()

    ckpt = read_checkpoint(resume, map_location=dev) if resume is not None else None
    _check_model(cfg)
    arrays = load_cifar(cfg.dataset, cfg.data, cfg.download and d.main, cfg.verify_data)
    data = DeviceCifar(arrays, dev, cfg.seed, cfg.train_subset, cfg.test_subset)
    ipe = data.iters_per_epoch(cfg.batch_size)
    sched = schedule(cfg, ipe)
    options = _model_options(cfg, data.num_classes)
    torch.manual_seed(cfg.seed)
    eager = create_model(cfg.model, **options).to(dev)
    if ckpt is None:  # the run folder comes last, so bad input leaves nothing behind
        name = cfg.run_name or default_name(cfg.model, cfg.dataset, cfg.preset)
        run_dir = make_run_dir(cfg.out_dir, name) if d.main else None
        run_dir = Path(d.broadcast(str(run_dir)))
    else:
        run_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent
    if channels_last:
        eager = eager.to(memory_format=torch.channels_last)
    if cfg.sync_bn and d.world > 1:
        eager = nn.SyncBatchNorm.convert_sync_batchnorm(eager)
    opt = torch.optim.SGD(eager.parameters(), lr=sched.lr_at(0), momentum=cfg.momentum,
                          nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    step, acc = 0, torch.zeros(4, device=dev, dtype=torch.float64)  # loss sum, errors, count, non-finite
    torch.manual_seed(cfg.seed + d.rank)  # dropout shortcuts: each process its own stream
    log = RunLog(run_dir) if d.main else None
    if ckpt is not None:
        eager.load_state_dict(ckpt["model_state"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        acc = torch.tensor(ckpt["log_acc"], device=dev, dtype=torch.float64) * (d.rank == 0)
        set_rng_state(ckpt["rng"][d.rank % len(ckpt["rng"])])
        if log:
            log.truncate(step)
    elif d.main:
        write_json(run_dir / "config.json", {"config": cfg.as_dict(), "code": code_version(),
                                             "world_size": d.world, "device": str(dev)})
    wrapped: nn.Module = eager
    if d.world > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            eager, device_ids=[dev.index] if dev.type == "cuda" else None)
    runner = torch.compile(wrapped) if cfg.compile else wrapped

    def status(state: str, **extra: Any) -> None:
        if d.main:
            write_json(run_dir / "status.json", {"status": state, "iteration": step, **extra})

    def checkpoint() -> None:
        """Save the latest state, if it is finite (the last good checkpoint is never overwritten)."""
        states = d.gather(rng_state())
        total = d.sum_(acc.clone())
        finite = all(bool(torch.isfinite(p).all()) for p in eager.parameters())
        if d.main and finite and total[3] == 0:
            save_checkpoint(run_dir / "checkpoint.pt", dict(
                model=cfg.model, options=options, model_state=eager.state_dict(),
                optimizer=opt.state_dict(), step=step, epoch=step / ipe, rng=states,
                log_acc=total.tolist(), config=cfg.as_dict(), code=code_version()))

    every_ckpt = cfg.checkpoint_every or ipe
    every_eval = cfg.eval_every or ipe
    bar = tqdm(total=sched.stop, initial=step, disable=not (cfg.progress and d.main),
               desc=run_dir.name, dynamic_ncols=True)
    timer, images, last = time.perf_counter(), 0, None
    t_start = time.perf_counter()
    status("running")
    with _stop_on_signals() as sig:
        while step < sched.stop:
            if cfg.halt_at is not None and step >= cfg.halt_at:
                sig["sig"] = "halt_at"
            stop_now = torch.tensor(float(sig["sig"] is not None), device=dev)
            if d.world == 1 or step % 10 == 0 or sig["sig"] == "halt_at":
                if float(d.sum_(stop_now)) > 0:
                    checkpoint()
                    status("interrupted", reason=sig["sig"] or "another process was signalled")
                    bar.close()
                    if d.main:
                        print(f"gradflow.train: stopped by {sig['sig']} at iteration {step}; "
                              f"resume with --resume {run_dir}", flush=True)
                    return run_dir
            epoch, index = divmod(step, ipe)
            lr = sched.lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = data.train_batch(epoch, index, cfg.batch_size, d.rank, d.world)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            probing = bool(cfg.probe_every) and step % cfg.probe_every == 0
            tracer = _trace(eager) if probing and d.main else nullcontext()
            with tracer as tr:
                loss, logits = forward_backward(wrapped if probing else runner, opt, x, y, amp)
            if probing and d.main:
                append_probe(run_dir, tr.units, step)
            opt.step()
            step += 1
            images += cfg.batch_size
            bar.update(1)
            with torch.no_grad():
                l = loss.detach().double()
                acc += torch.stack([l * len(y), (logits.argmax(1) != y).sum().double(),
                                    torch.tensor(float(len(y)), device=dev, dtype=torch.float64),
                                    (~torch.isfinite(l)).double()])
            do_eval = step % every_eval == 0 or step == sched.stop
            if step % cfg.log_every and not do_eval and step % every_ckpt:
                continue
            # a log point: the losses since the last one, then maybe evaluation and a checkpoint
            train_time = time.perf_counter() - timer
            total = d.sum_(acc.clone()).tolist()
            if total[3] > 0:
                _diverged(cfg, run_dir, step, lr, log, status, bar)
            if step % cfg.log_every and not do_eval:
                checkpoint()
                continue
            row = dict(iteration=step, epoch=round(step / ipe, 4), lr=lr,
                       train_loss=total[0] / total[2], train_error=total[1] / total[2],
                       images_per_s=images / max(train_time, 1e-9),
                       wall_time=time.perf_counter() - t_start)
            if do_eval:
                row["test_loss"], row["test_error"] = _evaluate(runner, data, d, amp, channels_last)
                last = row["test_error"]
            acc.zero_()
            if log:
                log.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", err=f"{row['train_error']:.3f}",
                            img_s=f"{row['images_per_s']:.0f}", refresh=False)
            if step % every_ckpt == 0 or step == sched.stop:
                checkpoint()
            timer, images = time.perf_counter(), 0
    bar.close()
    verdict = "fail" if last is not None and last > cfg.fail_error else "ok"
    status(verdict, test_error=last, fail_error=cfg.fail_error)
    return run_dir


@contextmanager
def _trace(model: nn.Module):
    from ..tracing import trace
    with trace(model) as tr:
        yield tr


def _diverged(cfg, run_dir, step, lr, log, status, bar) -> None:
    ckpt = run_dir / "checkpoint.pt"
    kept = f"the last good checkpoint {ckpt} is kept" if ckpt.exists() else "no checkpoint was saved yet"
    msg = (f"training diverged: the loss became NaN or Inf by iteration {step} (lr {lr:g}); "
           f"{kept}. Lower --lr, keep the warm-up (--warmup-iters), or check the model options.")
    status("diverged", message=msg)
    bar.close()
    raise TrainingDiverged(msg)
