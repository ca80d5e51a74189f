"""The trainer: ``train(config) -> run folder``. One process, or one of several under torchrun (DDP).

Results do not depend on the number of processes beyond BN batch statistics:
every process draws the same global batch (gradflow.data.cifar) and takes its equal
slice; DDP averages the gradients, which equals the single-process mean loss's
gradient. Test error is summed over shards of the test set.

This module checks the input, reads the data, builds the model and opens the
run folder (in that order, so bad input leaves nothing behind); the steps
themselves are in ``steps.py``, the folder's lock and temporaries in ``folder.py``.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch

from gradflow.runs.checkpoint import read_checkpoint
from gradflow.utils.checks import check_model_options
from gradflow.data.cifar import SYNTHETIC, DeviceCifar, load_cifar, synthetic_arrays
from gradflow.errors import GradflowError
from gradflow.models.registry import check_options, create_model
from gradflow.training import distributed
from gradflow.training.config import TrainConfig, make_config
from gradflow.runs.folder import open_existing, open_fresh, read_status
from gradflow.training.presets import lr_schedule
from gradflow.runs.log import RunLog, default_name, write_json
from gradflow.training.steps import RunOutcome, Steps, TrainingDiverged, forward_backward, last_test_error, say  # noqa: F401

# Fields a resumed run may change: where the data is and how it runs, not what it computes;
# and ``stop``, to extend a finished run on purpose.
RESUMABLE = ("data", "download", "verify_data", "device", "progress", "halt_at", "compile", "out_dir",
             "stop")


def resume_config(run: str | Path, **changes: Any) -> TrainConfig:
    """The saved config of ``run`` (a run folder or checkpoint), with RESUMABLE ``changes``."""
    bad = sorted(set(changes) - set(RESUMABLE))
    if bad:
        raise GradflowError(f"a resumed run keeps its recipe; cannot change {', '.join(bad)} "
                            f"(only {', '.join(RESUMABLE)}): start a new run instead")
    path = run_folder(run)
    if path.is_dir() and not (path / "checkpoint.pt").exists() and not (path / "config.json").is_file():
        raise GradflowError(f"--resume {run}: the run stopped before it began (no config.json, no checkpoint): "
                            "start it again with the same command, without --resume (that takes the folder over)")
    if path.is_dir() and not (path / "checkpoint.pt").exists() and (path / "config.json").is_file():
        # killed before its first checkpoint: the run starts over from its saved config
        try:
            saved = json.loads((path / "config.json").read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise GradflowError(f"{path} has no checkpoint and its config.json is unreadable ({e}): "
                                "start a new run instead") from None
    else:
        saved = read_checkpoint(run)["config"]
    return make_config(saved, **{"halt_at": None, **changes})


def run_folder(resume: str | Path) -> Path:
    """The run folder ``--resume`` names (a folder, or the checkpoint.pt inside one); else a GradflowError.

    A checkpoint file outside a run folder is refused: resuming writes the folder's
    lock, status and logs beside the checkpoint.
    """
    path = Path(resume)
    if path.is_dir():
        return path
    if not path.exists():
        raise GradflowError(f"--resume {resume}: no such run folder")
    if not (path.parent / "config.json").exists():
        raise GradflowError(f"--resume {resume}: a checkpoint outside a run folder (no config.json beside it); "
                            "pass the run folder it belongs to, or load its weights with "
                            "gradflow.load_checkpoint and start a new run")
    return path.parent


def _model_options(cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    options = dict(cfg.model_options)
    if options.setdefault("num_classes", num_classes) != num_classes:
        raise GradflowError(f"num_classes={options['num_classes']} but {cfg.dataset} has {num_classes} "
                            f"classes: drop the num_classes option or pick the matching --dataset")
    return options


def _check_model(cfg: TrainConfig) -> None:
    """Unknown model names and options fail before any data is read."""
    check_model_options(cfg.model_options, check_options(cfg.model, cfg.model_options))


def _check_memory(cfg: TrainConfig, d: distributed.Dist, dev: torch.device) -> None:
    """Refuse a model or batch that cannot fit, sized on the meta device before anything is allocated.

    A model that cannot be built on the meta device is not sized (its real build follows).
    """
    from gradflow.utils.memory import check_fits, step_estimate
    options = _model_options(cfg, 100 if cfg.dataset == "cifar100" else 10)
    try:
        with torch.device("meta"):
            meta = create_model(cfg.model, **options)
    except Exception:  # noqa: BLE001  (an init that reads values cannot run on meta)
        return
    batch = max(cfg.batch_size // d.world, 1)
    opts = " ".join(f"{k}={v}" for k, v in sorted(cfg.model_options.items()))
    check_fits(step_estimate(meta, (batch, 3, 32, 32), dev, training=True), dev,
               f"training {cfg.model}{f' ({opts})' if opts else ''} at batch {batch} per process",
               "pass a smaller --batch-size or a narrower --model-opt width")


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


def train(config: TrainConfig, resume: Optional[str | Path] = None) -> Path:
    """Train ``config`` (or continue the run at ``resume``) and return its run folder.

    Under torchrun each process calls this; only rank 0 writes files.
    :func:`run_training` also says how the run ended.

    Args:
        config: the run's :class:`~gradflow.training.TrainConfig` (``resolve(preset, ...)`` builds one).
        resume: a run folder to continue from its checkpoint (its config is the run's own).
    Returns:
        The run folder.
    Raises:
        GradflowError: bad input; nothing trained.
        TrainingDiverged: NaN/Inf in the loss, a parameter or a buffer.
    """
    return run_training(config, resume).run_dir


def run_training(config: TrainConfig, resume: Optional[str | Path] = None) -> RunOutcome:
    """:func:`train`, returning how the run ended (status, reason, exit code) with its folder.

    Args:
        config: the run's :class:`~gradflow.training.TrainConfig`.
        resume: a run folder to continue from its checkpoint.
    Returns:
        A :class:`~gradflow.training.RunOutcome`: ``run_dir``, ``status``, ``reason``, ``exit_code``.
    Raises:
        GradflowError: bad input (flags, data, a run folder in use or damaged); nothing trained.
        TrainingDiverged: NaN/Inf in the loss, a parameter or a buffer; status ``diverged``.
        signals.Interrupted: a second SIGINT/SIGTERM stopped the run at once; status ``interrupted``.
        Exception: anything else after the run started (OSError on a full disk, ...) leaves
            status ``crashed``.
    """
    d = distributed.setup(config.device)
    try:
        with _backends(config, d.device):
            outcome = _train(config, resume, d)
        distributed.barrier()   # every rank done before the group goes (gloo aborted a rank that left early)
        return outcome
    finally:
        distributed.teardown()


def _load_data(cfg: TrainConfig, d: distributed.Dist):
    if cfg.synthetic:
        say(d, f"training on generated data, not CIFAR: {SYNTHETIC['classes']} colour classes, "
               f"{SYNTHETIC['n_train']} train / {SYNTHETIC['n_test']} test images (seed {cfg.seed})")
        return synthetic_arrays(dataset=cfg.dataset, seed=cfg.seed, **SYNTHETIC)
    return load_cifar(cfg.dataset, cfg.data, cfg.download and d.main, cfg.verify_data)


def _train(cfg: TrainConfig, resume, d: distributed.Dist) -> RunOutcome:
    dev = d.device
    if cfg.batch_size % d.world:
        raise GradflowError(f"batch_size={cfg.batch_size} does not split over {d.world} processes: "
                            f"use a multiple of {d.world}")
    if cfg.sync_bn and d.world > 1 and dev.type != "cuda":
        raise GradflowError("--sync-bn needs CUDA devices (torch's SyncBatchNorm is GPU-only): "
                            "drop --sync-bn on CPU")
    if cfg.probe_paths and d.world > 1:
        raise GradflowError(f"--probe-paths under torchrun ({d.world} processes): the path-length split is "
                            "not joined across processes; drop --probe-paths, or probe paths in a "
                            "single-process run")
    if cfg.probe_every:
        from gradflow.tracing import trace  # noqa: F401  (fail now, not at the first probe)
    _check_model(cfg)
    _check_memory(cfg, d, dev)
    data = DeviceCifar(_load_data(cfg, d), dev, cfg.seed, cfg.train_subset, cfg.test_subset)
    ipe = data.iters_per_epoch(cfg.batch_size)
    sched = lr_schedule(cfg, ipe)
    if sched.warmup_iters >= sched.stop > 0 and sched.warmup_lr != sched.lr:
        how = (f"at the warm-up lr {sched.warmup_lr:g} throughout" if sched.warmup_shape == "constant" else
               f"on the ramp from {sched.warmup_lr:g} throughout")
        say(d, f"note: the run stops at iteration {sched.stop}, inside the {sched.warmup_iters}-iteration "
               f"warm-up: it trains {how}, never at lr {sched.lr:g}; "
               f"pass a --stop beyond {sched.warmup_iters} or --warmup-iters 0")
    options = _model_options(cfg, data.num_classes)
    torch.manual_seed(cfg.seed)
    eager = create_model(cfg.model, **options).to(dev)
    run_dir, lock, ckpt = _open_folder(cfg, resume, d, dev, sched.stop)  # last: bad input leaves nothing
    try:
        if ckpt is not None and ckpt["step"] >= sched.stop:
            return _finished(cfg, d, run_dir, ckpt)
        return Steps(cfg, d, data, ipe, sched, options, eager, run_dir, ckpt).run()
    finally:
        if lock:
            lock.release()


def _open_folder(cfg: TrainConfig, resume, d: distributed.Dist, dev: torch.device, stop: int):
    """Rank 0 makes or locks the folder; every rank reads the checkpoint. Errors reach every rank.

    Returns (run_dir, lock or None, checkpoint dict or None).
    """
    lock, err, notes = None, None, []
    run_dir: Optional[Path] = None
    if d.main:
        try:
            if resume is None:
                name = cfg.run_name or default_name(cfg.model, cfg.dataset, cfg.preset)
                run_dir, lock, notes = open_fresh(cfg.out_dir, name)
            else:
                run_dir = run_folder(resume)
                lock, notes = open_existing(run_dir)
        except GradflowError as e:
            err = str(e)
    err, where = d.broadcast((err, str(run_dir)))
    if err:
        raise GradflowError(err)
    run_dir = Path(where)
    for note in notes:
        say(d, note)
    try:
        ckpt = None
        if resume is not None:
            path = Path(resume) if not Path(resume).is_dir() else Path(resume) / "checkpoint.pt"
            if path.exists():
                ckpt = read_checkpoint(path, map_location=dev)
            else:
                say(d, f"{run_dir} has no checkpoint (the run stopped before its first one): starting it over")
                if d.main:
                    RunLog(run_dir).restore(0, 0, 0)
        if ckpt is not None and ckpt["step"] > stop:
            raise GradflowError(f"stop={cfg.stop} (--stop) ends before iteration {ckpt['step']}, where "
                                f"{run_dir} is: a run is not shortened; pass a larger --stop or none")
    except BaseException:
        if lock:
            lock.release()
        raise
    return run_dir, lock, ckpt


def _finished(cfg: TrainConfig, d: distributed.Dist, run_dir: Path, ckpt: dict) -> RunOutcome:
    """A resumed run already at its stop: say so, complete its status if needed, train nothing."""
    saved = read_status(run_dir) if d.main else {}
    saved = d.broadcast(saved)
    if saved.get("status") in ("ok", "fail") and saved.get("iteration") == ckpt["step"]:
        err = saved.get("test_error")
        say(d, f"{run_dir} already finished at iteration {ckpt['step']} (status {saved['status']}"
               + (f", test error {err:.4f}" if isinstance(err, (int, float)) else "")
               + "): nothing to do. To train it longer, resume with a larger --stop")
        return RunOutcome(run_dir, saved["status"], already_finished=True)
    # stopped between its last checkpoint and its final status: the verdict comes from the log
    last = d.broadcast(last_test_error(run_dir) if d.main else None)
    verdict = "fail" if last is not None and last > cfg.fail_error else "ok"
    if d.main:
        write_json(run_dir / "status.json", {"status": verdict, "iteration": ckpt["step"],
                                             "test_error": last, "fail_error": cfg.fail_error})
    say(d, f"{run_dir} had trained to its stop ({ckpt['step']} iterations) but its status was "
           f"{saved.get('status')!r}: marked {verdict} from its log")
    return RunOutcome(run_dir, verdict, already_finished=True)
