"""Running an experiment's runs: skip finished ones, resume interrupted ones, one run per device slot.

Each run is a ``python -m gradflow train`` process (its own CUDA device through
``CUDA_VISIBLE_DEVICES``, or its share of the CPU), so a crash or an out-of-memory
in one run never takes the others down, and the same command can go to a
cluster scheduler instead (``--print-commands``). A run's state is read from
its folder alone (``status.json``, ``checkpoint.pt``, ``config.json``), so the
runner, a Slurm array and a later ``--collect`` all agree on what is done.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from gradflow.errors import GradflowError
from gradflow.experiments.planning import RunSpec, Scale, resume_args, train_args, train_command

FINISHED = ("ok", "fail", "diverged")   # status.json states that end a run


def run_state(folder: Path) -> str:
    """``missing``, ``finished``, ``resumable`` (a checkpoint to continue) or ``broken`` (nothing to resume)."""
    if not folder.exists():
        return "missing"
    status = _json(folder / "status.json").get("status")
    if status in FINISHED:
        return "finished"
    return "resumable" if (folder / "checkpoint.pt").exists() else "broken"


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def check_folder(spec: RunSpec, scale: Scale) -> None:
    """A run folder made with another scale, seed or model is an error, never silently reused."""
    saved = _json(spec.folder / "config.json").get("config")
    if not saved:
        return
    fields = scale.fields()
    want = {"seed": spec.seed, "model": spec.row.model, "width": scale.width, "stop": scale.stop,
            "batch_size": scale.batch_size, "warmup_shape": fields.get("warmup_shape", "constant")}
    have = {"seed": saved.get("seed"), "model": saved.get("model"),
            "width": float(saved.get("model_options", {}).get("width", 1.0)), "stop": saved.get("stop"),
            "batch_size": saved.get("batch_size"), "warmup_shape": saved.get("warmup_shape", "constant")}
    if "warmup_iters" in fields:
        want["warmup_iters"], have["warmup_iters"] = fields["warmup_iters"], saved.get("warmup_iters")
    if saved.get("schedule_unit", "iter") != "iter":
        have["stop"] = f"{have['stop']} epochs"
    bad = [f"{k}={have[k]!r} (this experiment: {want[k]!r})" for k in want if have[k] != want[k]]
    if bad:
        raise GradflowError(f"run folder {spec.folder} was made with {', '.join(bad)}: "
                            "pass another --out, or the --scale/--width/--stop/--batch-size it was made with (a "
                            "folder from before the laptop scale's linear warm-up needs a new --out)")


def command_for(spec: RunSpec, scale: Scale, data: str, verify: bool,
                device: Optional[str] = None) -> Optional[list[str]]:
    """The gradflow train command that brings ``spec`` to its end (None if it is finished)."""
    check_folder(spec, scale)
    state = run_state(spec.folder)
    if state == "finished":
        return None
    if state == "resumable":
        return train_command(resume_args(spec, data, verify, device))
    return train_command(train_args(spec, scale, data, verify, device))


@dataclass
class Outcome:
    spec: RunSpec
    action: str            # "skipped", "trained", "resumed", "error"
    returncode: int = 0
    seconds: float = 0.0
    message: str = ""


def _prepare(spec: RunSpec, scale: Scale, log: Callable[[str], None]) -> None:
    """A folder stopped before its first checkpoint has nothing to resume: move it aside, say so."""
    if run_state(spec.folder) == "broken":
        check_folder(spec, scale)
        stale = spec.folder.with_name(spec.folder.name + ".stale")
        log(f"{spec.key}: the folder holds no checkpoint to resume from (stopped before its first); "
            f"starting it again (the old folder moves to {stale.name})")
        shutil.rmtree(stale, ignore_errors=True)
        spec.folder.rename(stale)


def _lock(spec: RunSpec) -> Optional[str]:
    """Claim ``spec`` for this process (a ``.<run>.lock`` file beside its folder); None if claimed,
    else the claim that stands (another runner or array task of this machine is training it)."""
    path = spec.folder.parent / f".{spec.key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            text = path.read_text().strip() if path.exists() else ""
            host, _, pid = text.partition(":")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)   # its process is gone: a stale claim
                continue
            return text or "unknown"
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()}:{os.getpid()}")
        return None
    return "unknown"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlock(spec: RunSpec) -> None:
    (spec.folder.parent / f".{spec.key}.lock").unlink(missing_ok=True)


def _depth(spec: RunSpec) -> int:
    m = re.search(r"(\d+)$", spec.row.model)
    return int(m.group(1)) if m else 0


def longest_first(specs: list[RunSpec]) -> list[RunSpec]:
    """Deepest nets first (stable otherwise): with several runs at a time the sweep then ends on
    short runs instead of one long straggler (ResNet-164 steps cost 1.6x ResNet-110's on the CPU)."""
    return sorted(specs, key=_depth, reverse=True)


def execute(specs: list[RunSpec], scale: Scale, data: str, verify: bool, slots: list[dict],
            device: Optional[str], log_dir: Path, log: Callable[[str], None] = print) -> list[Outcome]:
    """Run every unfinished spec, ``len(slots)`` at a time (each slot: extra environment variables).

    Finished runs are skipped, interrupted ones resumed from their checkpoint, and a
    run another process holds (its lock file) is left to it; the state is read again
    just before each launch. A child's output goes to ``log_dir/<run>.out``.
    SIGINT/SIGTERM reach the children (they checkpoint and stop); no new run starts after that.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    todo = longest_first(specs) if len(slots) > 1 else list(specs)
    running: dict[int, tuple[subprocess.Popen, RunSpec, str, float, object]] = {}
    stop = {"sig": None}

    def on_signal(signum, frame):
        stop["sig"] = signum
        for proc, *_ in running.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        free = list(range(len(slots)))
        while todo or running:
            while todo and free and stop["sig"] is None:
                spec = todo.pop(0)
                holder = None if run_state(spec.folder) == "finished" else _lock(spec)
                if holder is not None:
                    outcomes.append(Outcome(spec, "error", 75, message=f"held by {holder}"))
                    log(f"{spec.key}: another process ({holder}) is training it: left to it")
                    continue
                _prepare(spec, scale, log)
                cmd = command_for(spec, scale, data, verify, device)
                if cmd is None:
                    _unlock(spec)
                    outcomes.append(Outcome(spec, "skipped", message="finished before"))
                    log(f"{spec.key}: finished before, skipped")
                    continue
                action = "resumed" if "--resume" in cmd else "trained"
                slot = free.pop(0)
                out = open(log_dir / f"{spec.key}.out", "a")
                out.write(f"$ {' '.join(cmd)}\n")
                out.flush()
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                        env={**os.environ, **slots[slot]})
                running[slot] = (proc, spec, action, time.perf_counter(), out)
                where = ", ".join(f"{k}={v}" for k, v in slots[slot].items()) or "this process's device"
                log(f"{spec.key}: {'resuming' if action == 'resumed' else 'training'} ({where})")
            if stop["sig"] is not None and not running:
                break
            time.sleep(0.2)
            for slot, (proc, spec, action, t0, out) in list(running.items()):
                if proc.poll() is None:
                    continue
                out.close()
                _unlock(spec)
                del running[slot]
                free.append(slot)
                outcomes.append(_finish(spec, action, proc.returncode, time.perf_counter() - t0,
                                        log_dir, log))
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    for spec in todo:
        outcomes.append(Outcome(spec, "error", 130, message="not started: the sweep was interrupted"))
    return outcomes


def _finish(spec: RunSpec, action: str, rc: int, seconds: float, log_dir: Path,
            log: Callable[[str], None]) -> Outcome:
    state = run_state(spec.folder)
    status = _json(spec.folder / "status.json")
    if state == "finished":
        err = status.get("test_error")
        what = f"test error {100 * err:.2f}%" if isinstance(err, (int, float)) else status.get("status")
        log(f"{spec.key}: {status.get('status')} after {seconds:.0f}s ({what})")
        return Outcome(spec, action, rc, seconds)
    tail = _last_line(log_dir / f"{spec.key}.out")
    if status.get("status") == "interrupted":
        tail = f"interrupted ({status.get('reason', '?')}); the same command resumes it"
        rc = rc if rc else 130
    log(f"{spec.key}: not finished (exit code {rc}, status {status.get('status', 'none')}): {tail}")
    return Outcome(spec, "error", rc or 1, seconds, tail)


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def device_slots(gpus: Optional[str], jobs: int) -> list[dict]:
    """One environment per concurrent run: ``CUDA_VISIBLE_DEVICES`` per GPU, else ``jobs`` CPU slots.

    ``gpus``: ``"auto"`` (every visible CUDA device, else the CPU), ``"none"``, or ``"0,1,3"``.
    """
    if gpus in (None, "auto"):
        import torch
        n = torch.cuda.device_count()
        if n:
            return [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(n)]
    elif gpus != "none":
        ids = [g.strip() for g in gpus.split(",") if g.strip()]
        if not ids or not all(g.isdigit() for g in ids):
            raise GradflowError(f"--gpus {gpus!r} is not 'auto', 'none' or a list like 0,1,2")
        import torch
        n = torch.cuda.device_count()
        absent = [g for g in ids if int(g) >= n]
        if absent:
            raise GradflowError(f"--gpus {gpus!r}: this machine has no visible CUDA device: pass --gpus none "
                                "(or auto) to train on the CPU" if n == 0 else
                                f"--gpus {gpus!r}: this machine has {n} visible CUDA device(s), so GPU "
                                f"{', '.join(absent)} is not there: pass ids below {n}, or --gpus none for the CPU")
        return [{"CUDA_VISIBLE_DEVICES": g} for g in ids]
    if jobs < 1:
        raise GradflowError(f"--jobs {jobs!r} must be >= 1 (concurrent runs on the CPU)")
    return [{} for _ in range(jobs)]
