"""The training steps of one run: the state the loop, checkpoints and status share, in one object.

``Steps(...).run()`` trains from the checkpoint's step (or 0) to the stop and
says how it ended (a RunOutcome). Every file write happens inside
``flag.writing()``, so a second signal waits for it; any exception after the
run started leaves status.json saying what happened (``crashed`` with the
error, ``interrupted``, ``diverged``).
"""
from __future__ import annotations

import errno
import json
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from gradflow.utils import checks as cli
from gradflow.data.cifar import DeviceCifar
from gradflow.errors import GradflowError
from gradflow.training import distributed
from gradflow.runs.checkpoint import misfit, rng_state, save_checkpoint, set_rng_state
from gradflow.training.config import TrainConfig
from gradflow.training.precision import BF16, FP32, choose_amp
from gradflow.runs.layout import FILES
from gradflow.runs.log import RunLog, code_version, read_log, write_json
from gradflow.training.signals import Interrupted, StopFlag, stop_on_signals


class TrainingDiverged(RuntimeError):
    """The loss, a parameter or a buffer became NaN or Inf. The last good checkpoint is kept."""


@dataclass
class RunOutcome:
    """How a call to the trainer ended: the folder, its status and the CLI's exit code for it.

    ``status``: ok, fail, or interrupted (``reason``: SIGINT, SIGTERM or halt_at).
    ``already_finished``: a finished run was resumed and nothing was trained.
    """

    run_dir: Path
    status: str
    reason: Optional[str] = None
    already_finished: bool = False

    @property
    def exit_code(self) -> int:
        if self.status == "ok":
            return cli.EXIT_OK
        if self.status == "interrupted":
            return {"SIGINT": cli.EXIT_SIGINT, "SIGTERM": cli.EXIT_SIGTERM}.get(self.reason or "",
                                                                                 cli.EXIT_HALTED)
        return cli.EXIT_FAILED


def say(d: distributed.Dist, text: str) -> None:
    """One line to the user from rank 0 (stderr, so stdout stays for results)."""
    if d.main:
        print(f"gradflow train: {text}", file=sys.stderr, flush=True)


def describe_error(e: BaseException) -> str:
    """One line for status.json and the user; OS errors by their errno name (ENOSPC: disk full)."""
    if isinstance(e, OSError) and e.errno is not None:
        name = errno.errorcode.get(e.errno, str(e.errno))
        where = f" ({e.filename})" if e.filename else ""
        hint = "; the disk is full: free space, then --resume" if e.errno == errno.ENOSPC else ""
        return f"{name}: {e.strerror or e}{where}{hint}"
    return f"{type(e).__name__}: {e}"


def first_nonfinite(model: nn.Module) -> Optional[str]:
    """The first parameter or floating buffer (BN running statistics) holding NaN/Inf, by name."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"{kind} {name}"
    return None


def _read_json(path: Path) -> dict:
    """A JSON object file as a dict ({} when missing, damaged or not an object)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def check_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Each parameter's saved momentum buffer has the parameter's shape (else the first step fails)."""
    for group in opt.param_groups:
        for p in group["params"]:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None and (not isinstance(buf, torch.Tensor) or buf.shape != p.shape):
                raise ValueError(f"optimizer momentum buffer of shape {tuple(getattr(buf, 'shape', ()))} "
                                 f"for a parameter of shape {tuple(p.shape)}")


def last_test_error(run_dir: Path) -> Optional[float]:
    """The last logged test error of a run folder (None if never evaluated)."""
    return next((r["test_error"] for r in reversed(read_log(run_dir)) if r.get("test_error") is not None),
                None)


def forward_backward(runner: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                     y: torch.Tensor, amp=nullcontext):
    """Cross-entropy of one batch and its gradients (the caller steps): (loss, logits), on the device."""
    with amp():
        logits = runner(x)
    loss = F.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return loss, logits


def evaluate(runner: nn.Module, data: DeviceCifar, d: distributed.Dist, amp, channels_last: bool,
             batch_size: int = 128):
    """Test loss and error over the whole test set (summed over processes), in this process's
    training batch size: larger batches outgrow the CPU's cache (500 images made a width-0.5
    ResNet-164's evaluation 1.85x slower than 128 on the 2-core machine)."""
    was = runner.training
    runner.eval()
    acc = torch.zeros(3, device=d.device, dtype=torch.float64)  # loss sum, errors, count
    with torch.no_grad(), amp():
        for x, y in data.test_batches(batch_size, d.rank, d.world):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = runner(x).float()
            acc += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                                (logits.argmax(1) != y).sum().double(),
                                torch.tensor(len(y), device=d.device, dtype=torch.float64)])
    runner.train(was)
    loss, err, n = d.sum_(acc).tolist()
    return loss / max(n, 1), err / max(n, 1)


@contextmanager
def _trace(model: nn.Module, write=None, paths: int = 0):
    from gradflow.tracing import FunctionSink, trace   # the probe's rows stream through the tracer's sink
    with trace(model, sinks=[FunctionSink(write)] if write else (), history=0, paths=paths or None) as tr:
        yield tr


class Steps:
    """One run's training state: model, optimiser, step, log, and where it all goes."""

    def __init__(self, cfg: TrainConfig, d: distributed.Dist, data: DeviceCifar, ipe: int, sched,
                 options: dict, eager: nn.Module, run_dir: Path, ckpt: Optional[dict]):
        self.cfg, self.d, self.data, self.ipe, self.sched = cfg, d, data, ipe, sched
        self.options, self.run_dir = options, run_dir
        dev = self.dev = d.device
        self.use_amp, why = choose_amp(cfg, dev, run_dir if ckpt is not None else None)
        # NHWC is faster for convolutions on cuda (cudnn) and on the cpu (oneDNN): 21-35% per step on
        # the CPU for the zoo's CIFAR nets (benchmarks/train_bench.py); mps keeps NCHW
        self.channels_last = (cfg.channels_last if cfg.channels_last is not None
                              else dev.type in ("cuda", "cpu"))
        if self.channels_last:
            eager = eager.to(memory_format=torch.channels_last)
        if cfg.sync_bn and d.world > 1:
            eager = nn.SyncBatchNorm.convert_sync_batchnorm(eager)
        self.eager = eager
        self.opt = torch.optim.SGD(eager.parameters(), lr=sched.lr_at(0), momentum=cfg.momentum,
                                   nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        self.step = 0
        self.acc = torch.zeros(4, device=dev, dtype=torch.float64)  # loss sum, errors, count, non-finite
        self.saved_step: Optional[int] = None   # the step of the checkpoint on disk
        self.log = RunLog(run_dir) if d.main else None
        self.last: Optional[float] = None       # the latest test error
        self.flag = StopFlag()
        self.code = code_version()               # once: git runs in a subprocess
        wall0 = 0.0                              # seconds trained before this process: wall_time goes on
        torch.manual_seed(cfg.seed + d.rank)    # dropout shortcuts: each process its own stream
        if ckpt is not None:
            wall0 = self._restore(ckpt)
        elif d.main:
            write_json(run_dir / "config.json", {"config": cfg.as_dict(), "code": self.code,
                                                 "world_size": d.world, "device": str(dev),
                                                 "precision": self.precision()})
        if cfg.probe_every and d.world > 1:
            say(d, f"--probe-every {cfg.probe_every}: each probe records the global batch ({cfg.batch_size} "
                   f"samples from {d.world} processes, gathered to rank 0, one collective per probe)")
        if cfg.amp == "auto":   # the one default that depends on the hardware: said, not silent
            say(d, f"precision: {self.precision()} (--amp auto: {why})")
        self.t_start = time.perf_counter() - wall0
        wrapped: nn.Module = eager
        if d.world > 1:
            wrapped = nn.parallel.DistributedDataParallel(
                eager, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.wrapped = wrapped
        self.runner = torch.compile(wrapped) if cfg.compile else wrapped

    def _restore(self, ckpt: dict) -> float:
        """Load the checkpoint's state and cut the logs back to it; returns the seconds trained so far."""
        d, cfg = self.d, self.cfg
        try:
            self.eager.load_state_dict(ckpt["model_state"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.step = self.saved_step = int(ckpt["step"])
            self.acc = torch.tensor(ckpt["log_acc"], device=self.dev, dtype=torch.float64) * (d.rank == 0)
            set_rng_state(ckpt["rng"][d.rank % len(ckpt["rng"])])
            check_optimizer_state(self.opt)
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as e:
            raise GradflowError(misfit(self.run_dir / FILES["checkpoint"], e)) from None
        wall0 = ckpt.get("wall_time")
        if self.log:
            for note in self.log.restore(self.step, ckpt.get("log_rows"), ckpt.get("probe_rows"),
                                         ckpt.get("paths_rows")):
                say(d, note)
            self.last = last_test_error(self.run_dir)
            if wall0 is None:  # checkpoints from before gradflow saved it: the last logged time
                wall0 = next((r["wall_time"] for r in reversed(read_log(self.run_dir)) if r.get("wall_time")), 0.0)
            old_stop = ckpt["config"].get("stop")
            if not isinstance(_read_json(self.run_dir / FILES["config"]).get("config"), dict):
                say(d, f"{self.run_dir / FILES['config']} was missing or damaged: rewritten from the checkpoint")
                write_json(self.run_dir / FILES["config"], {
                    "config": cfg.as_dict(), "code": ckpt.get("code", self.code), "world_size": d.world,
                    "device": str(self.dev), "precision": self.precision()})
            elif cfg.stop != old_stop:
                say(d, f"--stop changed on resume: {old_stop} -> {cfg.stop} (config.json updated)")
                path = self.run_dir / "config.json"
                saved = json.loads(path.read_text()) if path.exists() else {}
                write_json(path, {**saved, "config": cfg.as_dict()})
        return float(wall0 or 0.0)

    def precision(self) -> str:
        """``"bf16 autocast"`` or ``"float32"``: how this run computes, for config.json and captions."""
        return BF16 if self.use_amp else FP32

    def amp(self):
        return torch.autocast(self.dev.type, dtype=torch.bfloat16) if self.use_amp else nullcontext()

    # --- writing ---------------------------------------------------------------------------

    def status(self, state: str, **extra: Any) -> None:
        if self.d.main:
            write_json(self.run_dir / "status.json", {"status": state, "iteration": self.step, **extra})

    def _final_status(self, state: str, **extra: Any) -> None:
        """A status written while the process goes down: a full disk must not hide the first error."""
        try:
            self.status(state, **extra)
        except OSError:
            pass

    def checkpoint(self) -> None:
        """Save the latest state if every parameter and buffer is finite; else the run diverged."""
        d = self.d
        states = d.gather(rng_state())
        total = d.sum_(self.acc.clone())
        bad = first_nonfinite(self.eager)
        if float(d.sum_(torch.tensor(float(bad is not None), device=self.dev))) > 0:
            self.diverged(f"{bad or 'a tensor on another process'} holds NaN or Inf after iteration {self.step}")
        if d.main and total[3] == 0:
            save_checkpoint(self.run_dir / "checkpoint.pt", dict(
                model=self.cfg.model, options=self.options, model_state=self.eager.state_dict(),
                optimizer=self.opt.state_dict(), step=self.step, epoch=self.step / self.ipe, rng=states,
                log_acc=total.tolist(), config=self.cfg.as_dict(), code=self.code,
                wall_time=time.perf_counter() - self.t_start, log_rows=self.log.rows,
                probe_rows=self.log.probe_rows, paths_rows=self.log.paths_rows))
            self.saved_step = self.step

    def diverged(self, what: str) -> None:
        ckpt = self.run_dir / "checkpoint.pt"
        kept = f"the last good checkpoint {ckpt} is kept" if ckpt.exists() else "no checkpoint was saved yet"
        lr = self.sched.lr_at(max(self.step - 1, 0))
        msg = (f"training diverged: {what} (lr {lr:g}); {kept}. Lower --lr, keep the warm-up "
               "(--warmup-iters), or check the model options.")
        self.status("diverged", message=msg)
        self.bar.close()
        raise TrainingDiverged(msg)

    # --- the run ---------------------------------------------------------------------------

    def run(self) -> RunOutcome:
        """Train to the stop (or a signal); record how it ended in status.json and return it."""
        cfg, d = self.cfg, self.d
        self.bar = tqdm(total=self.sched.stop, initial=self.step, disable=not (cfg.progress and d.main),
                        desc=self.run_dir.name, dynamic_ncols=True)
        self.status("running")
        with stop_on_signals() as flag:
            self.flag = flag
            try:
                stopped = self._loop()
                if stopped is not None:
                    return stopped
                verdict = "fail" if self.last is not None and self.last > cfg.fail_error else "ok"
                with flag.writing():
                    self.status(verdict, test_error=self.last, fail_error=cfg.fail_error)
                return RunOutcome(self.run_dir, verdict)
            except (TrainingDiverged, GradflowError):
                raise
            except Interrupted as e:
                kept = self.saved_step
                msg = (f"a second {e.signal} stopped the run at once at iteration {self.step}; "
                       + (f"--resume continues from the checkpoint at iteration {kept}" if kept is not None
                          else "no checkpoint yet: --resume starts it over"))
                self._final_status("interrupted", reason=f"second {e.signal}", message=msg)
                say(d, msg)
                raise
            except BaseException as e:
                self._final_status("crashed", error=describe_error(e))
                raise
            finally:
                self.bar.close()

    def _stop_requested(self) -> bool:
        cfg, d, flag = self.cfg, self.d, self.flag
        if cfg.halt_at is not None and self.step >= cfg.halt_at and not flag:
            flag.name = "halt_at"
        if not (d.world == 1 or self.step % 10 == 0 or flag.name == "halt_at"):
            return False  # collectives every 10 steps only
        return float(d.sum_(torch.tensor(float(bool(flag)), device=self.dev))) > 0

    def _loop(self) -> Optional[RunOutcome]:
        """The steps; a RunOutcome if stopped by a signal or --halt-at, None at the stop."""
        cfg, d, data, flag, sched = self.cfg, self.d, self.data, self.flag, self.sched
        every_ckpt = cfg.checkpoint_every or self.ipe
        every_eval = cfg.eval_every or self.ipe
        timer, images = time.perf_counter(), 0
        while self.step < sched.stop:
            if self._stop_requested():
                reason = flag.name or "SIGTERM"  # another process was signalled
                with flag.writing():
                    self.checkpoint()
                    self.status("interrupted", reason=reason)
                if d.main:
                    print(f"gradflow train: stopped by {reason} at iteration {self.step}; "
                          f"resume with --resume {self.run_dir}", flush=True)
                return RunOutcome(self.run_dir, "interrupted", reason)
            epoch, index = divmod(self.step, self.ipe)
            lr = sched.lr_at(self.step)
            for g in self.opt.param_groups:
                g["lr"] = lr
            x, y = data.train_batch(epoch, index, cfg.batch_size, d.rank, d.world)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            probing = bool(cfg.probe_every) and self.step % cfg.probe_every == 0
            def probe_rows(units, samples, step=self.step):
                with flag.writing():
                    self.log.append_probe(units, step)
            # every rank traces its slice; the rows are joined into the global batch's (rank 0 writes)
            with (_trace(self.eager, probe_rows, cfg.probe_paths) if probing else nullcontext()) as tr:
                loss, logits = forward_backward(self.wrapped if probing else self.runner, self.opt, x, y,
                                                self.amp)
            if tr is not None and cfg.probe_paths:
                with flag.writing():
                    self.log.append_paths(tr.paths, self.step)
            self.opt.step()
            self.step += 1
            images += cfg.batch_size
            self.bar.update(1)
            with torch.no_grad():
                l = loss.detach().double()
                self.acc += torch.stack([l * len(y), (logits.argmax(1) != y).sum().double(),
                                         torch.tensor(float(len(y)), device=self.dev, dtype=torch.float64),
                                         (~torch.isfinite(l)).double()])
            step = self.step
            do_eval = step % every_eval == 0 or step == sched.stop
            if step % cfg.log_every and not do_eval and step % every_ckpt:
                continue
            # a log point: the losses since the last one, then maybe evaluation and a checkpoint
            train_time = time.perf_counter() - timer
            total = d.sum_(self.acc.clone()).tolist()
            if total[3] > 0:
                self.diverged(f"the loss became NaN or Inf by iteration {step}")
            if step % cfg.log_every and not do_eval:
                with flag.writing():
                    self.checkpoint()
                continue
            row = dict(iteration=step, epoch=round(step / self.ipe, 4), lr=lr,
                       train_loss=total[0] / total[2], train_error=total[1] / total[2],
                       images_per_s=images / max(train_time, 1e-9),
                       wall_time=time.perf_counter() - self.t_start)
            if do_eval:
                row["test_loss"], row["test_error"] = evaluate(self.runner, data, d, self.amp,
                                                               self.channels_last,
                                                               max(1, cfg.batch_size // d.world))
                self.last = row["test_error"]
            self.acc.zero_()
            with flag.writing():
                if self.log:
                    self.log.append(row)
                self.bar.set_postfix(loss=f"{row['train_loss']:.3f}", err=f"{row['train_error']:.3f}",
                                     img_s=f"{row['images_per_s']:.0f}", refresh=False)
                if step % every_ckpt == 0 or step == sched.stop:
                    self.checkpoint()  # at the stop too: the state after the last update is checked
            timer, images = time.perf_counter(), 0
        return None
