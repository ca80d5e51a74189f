"""The one configuration of a training run: a typed dataclass, saved resolved beside the results."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from gradflow.utils.checks import SEED_MAX, STOP, Number, check_numbers, flag
from gradflow.errors import GradflowError, unknown

# Every numeric field's allowed range: checked in one place, with the flag's name in the message.
NUMBERS: dict[str, Number] = {
    "batch_size": Number(1, integer=True),
    "lr": Number(0, low_open=True, hint="the paper uses 0.1"),
    "warmup_lr": Number(0, low_open=True, hint="the paper uses 0.01"),
    "warmup_iters": Number(0, integer=True),
    "milestones": Number(0, integer=True, hint="comma-separated, e.g. 32000,48000"),
    "gamma": Number(0, low_open=True, hint="the lr factor at each milestone; the paper uses 0.1"),
    "stop": STOP,
    "momentum": Number(0, 1, hint="the paper uses 0.9"),
    "weight_decay": Number(0, hint="the paper uses 1e-4"),
    "seed": Number(0, SEED_MAX, integer=True),
    "log_every": Number(1, integer=True),
    "eval_every": Number(0, integer=True, hint="0: once an epoch"),
    "checkpoint_every": Number(0, integer=True, hint="0: once an epoch"),
    "probe_every": Number(0, integer=True, hint="0: never"),
    "probe_paths": Number(0, integer=True, hint="0: off; N: path lengths 0..N apart, longer ones summed"),
    "fail_error": Number(0, 1, hint="a test error fraction; the paper calls > 0.2 a failure"),
    "train_subset": Number(0, integer=True, hint="0: all images"),
    "test_subset": Number(0, integer=True, hint="0: all images"),
    "halt_at": Number(0, integer=True, hint="an iteration"),
}


@dataclass
class TrainConfig:
    """Everything a run depends on. Defaults are the paper's recipe (docs/theory.md, section 7.3)."""

    # what to train
    model: str = "resnet110"          # a registered name (gradflow.list_models())
    model_options: dict[str, Any] = field(default_factory=dict)  # create_model keywords: unit, shortcut, ...
    dataset: str = "cifar10"          # "cifar10" or "cifar100"
    data: str = "data"                # folder holding the CIFAR tarball or its extracted folder
    synthetic: bool = False           # generated CIFAR-shaped data instead of --data (smoke tests)
    download: bool = False            # fetch through torchvision (needs internet)
    verify_data: bool = True          # md5 of every file, as torchvision checks
    preset: Optional[str] = None      # the Table 1/2/3 row this run reproduces, if any
    recipe: str = "paper"             # the recipe the schedule came from: "paper" or "official"

    # the recipe: SGD with a step schedule
    batch_size: int = 128             # global batch, split evenly over processes
    lr: float = 0.1                   # the paper's base learning rate
    warmup_lr: float = 0.01           # paper: 0.01 until training error < 80%, about 400 iterations
    warmup_iters: int = 400           # iterations at warmup_lr (always counted in iterations)
    warmup_shape: str = "constant"    # "constant": warmup_lr throughout (paper); "linear": warmup_lr -> lr
    milestones: tuple[int, ...] = (32000, 48000)  # lr *= gamma once this many schedule units are done
    gamma: float = 0.1                # "divided by 10"
    stop: int = 64000                 # length of the run, in schedule units
    schedule_unit: str = "iter"       # unit of milestones and stop: "iter" or "epoch"
    momentum: float = 0.9             # paper and official code
    nesterov: bool = False            # the official code's run uses Nesterov
    weight_decay: float = 1e-4        # on every parameter, BN included, as the official code

    # how to run it
    seed: int = 0                     # model init, data order and augmentation
    device: str = "auto"              # "auto": cuda if available, else cpu
    amp: str = "auto"                 # "bf16", "none"; auto: bf16 where hardware has it (cuda, bf16 cpus)
    channels_last: Optional[bool] = None  # None: on for cuda and cpu (cudnn and oneDNN both prefer NHWC)
    compile: bool = False             # torch.compile the model (minutes of warm-up, faster after)
    deterministic: bool = False       # deterministic kernels, no cudnn autotuning
    sync_bn: bool = False             # BN statistics over all processes' batches (DDP only)

    # what to record
    log_every: int = 100              # iterations between log rows (train loss/error averaged over them)
    eval_every: int = 0               # iterations between test evaluations; 0: once per epoch
    checkpoint_every: int = 0         # iterations between checkpoints; 0: once per epoch
    probe_every: int = 0              # iterations between gradient-flow traces; 0: never
    probe_paths: int = 0              # with probe_every: split dE/dx_l by path length 0..N (0: off)
    fail_error: float = 0.20          # a finished run above this test error is marked "fail" (paper)
    out_dir: str = "runs"             # run folders go here
    run_name: Optional[str] = None    # None: <preset or model>-<dataset>-<time>
    progress: bool = True             # tqdm bar on rank 0

    # small runs
    train_subset: int = 0             # use only the first N training images (0: all)
    test_subset: int = 0              # use only the first N test images (0: all)
    halt_at: Optional[int] = None     # stop at this iteration with a checkpoint, as if interrupted

    def __post_init__(self) -> None:
        check_numbers(dataclasses.asdict(self), NUMBERS)  # before any conversion: 2.5 stays refused
        self.milestones = tuple(int(m) for m in self.milestones)
        self.model_options = dict(self.model_options)
        checks = [
            (self.schedule_unit in ("iter", "epoch"), "schedule_unit", "'iter' or 'epoch'"),
            (self.amp in ("auto", "bf16", "none"), "amp", "'auto', 'bf16' or 'none'"),
            (self.warmup_shape in ("constant", "linear"), "warmup_shape", "'constant' (the paper's) or 'linear'"),
            (list(self.milestones) == sorted(self.milestones), "milestones", "increasing"),
            (not self.nesterov or self.momentum > 0, "momentum",
             "> 0 with --nesterov (Nesterov momentum needs momentum): drop --nesterov or set --momentum"),
            (isinstance(self.out_dir, str) and self.out_dir.strip() != "", "out_dir",
             "a folder name (an empty --out-dir would write into the current folder)"),
            (self.synthetic or (isinstance(self.data, str) and self.data.strip() != ""), "data",
             "a CIFAR folder (or leave --data out and pass --synthetic for generated data)"),
            (not self.synthetic or self.data == "data", "data",
             "left out with --synthetic (the generated data is used, so --data would be ignored): pass one "
             "of them"),
            (self.run_name is None or _single_segment(self.run_name), "run_name",
             "a single folder name inside --out-dir (no '/', '..' or absolute path)"),
            (not self.probe_paths or self.probe_every > 0, "probe_paths",
             "used with --probe-every N (the path-length split is recorded at the probes)"),
            (_takes_images(self.model), "model", "a model that takes images: the trainer trains CIFAR "
             "classifiers, and gpt-* models take token ids (probe them: python -m gradflow.probe --model ...)"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise GradflowError(f"{name}={getattr(self, name)!r} ({flag(name)}) must be {want}")

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d


def _takes_images(name: str) -> bool:
    """False for a registered model that takes token ids (gradflow.model_inputs); unknown names fail later."""
    from gradflow.models.registry import list_models, model_inputs
    return name not in list_models() or model_inputs(name)["kind"] == "image"


def _single_segment(name: str) -> bool:
    """True if ``name`` names a folder directly inside another: not empty, '.', '..', no separator."""
    seps = [os.sep] + ([os.altsep] if os.altsep else []) + ["/"]
    return (isinstance(name, str) and name.strip() not in ("", ".", "..") and "\0" not in name
            and not any(sep in name for sep in seps))


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def make_config(base: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a dict (a preset, a saved config) updated by ``overrides``.

    Unknown keys raise an error that lists the fields which exist.
    """
    merged = {**(base or {}), **overrides}
    for key in merged:
        if key not in FIELDS:
            raise unknown("config field", key, FIELDS)
    return TrainConfig(**merged)
