"""The one configuration of a training run: a typed dataclass, saved resolved beside the results."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import GradflowError, unknown


@dataclass
class TrainConfig:
    """Everything a run depends on. Defaults are the paper's recipe (PAPER.md section 5)."""

    # what to train
    model: str = "resnet110"          # a registered name (gradflow.list_models())
    model_options: dict[str, Any] = field(default_factory=dict)  # create_model keywords: unit, shortcut, ...
    dataset: str = "cifar10"          # "cifar10" or "cifar100"
    data: str = "data"                # folder holding the CIFAR tarball or its extracted folder
    download: bool = False            # fetch through torchvision (needs internet)
    verify_data: bool = True          # md5 of every file, as torchvision checks
    preset: Optional[str] = None      # the Table 1/2/3 row this run reproduces, if any
    recipe: str = "paper"             # the recipe the schedule came from: "paper" or "official"

    # the recipe: SGD with a step schedule
    batch_size: int = 128             # global batch, split evenly over processes
    lr: float = 0.1                   # the paper's base learning rate
    warmup_lr: float = 0.01           # paper: 0.01 until training error < 80%, about 400 iterations
    warmup_iters: int = 400           # iterations at warmup_lr (always counted in iterations)
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
    amp: str = "auto"                 # "bf16" or "none"; auto: bf16 on cuda (no loss scaling needed)
    channels_last: Optional[bool] = None  # None: on for cuda, where cudnn prefers NHWC
    compile: bool = False             # torch.compile the model (minutes of warm-up, faster after)
    deterministic: bool = False       # deterministic kernels, no cudnn autotuning
    sync_bn: bool = False             # BN statistics over all processes' batches (DDP only)

    # what to record
    log_every: int = 100              # iterations between log rows (train loss/error averaged over them)
    eval_every: int = 0               # iterations between test evaluations; 0: once per epoch
    checkpoint_every: int = 0         # iterations between checkpoints; 0: once per epoch
    probe_every: int = 0              # iterations between gradient-flow traces; 0: never
    fail_error: float = 0.20          # a finished run above this test error is marked "fail" (paper)
    out_dir: str = "runs"             # run folders go here
    run_name: Optional[str] = None    # None: <preset or model>-<dataset>-<time>
    progress: bool = True             # tqdm bar on rank 0

    # small runs
    train_subset: int = 0             # use only the first N training images (0: all)
    test_subset: int = 0              # use only the first N test images (0: all)
    halt_at: Optional[int] = None     # stop at this iteration with a checkpoint, as if interrupted

    def __post_init__(self) -> None:
        self.milestones = tuple(int(m) for m in self.milestones)
        self.model_options = dict(self.model_options)
        checks = [
            (self.schedule_unit in ("iter", "epoch"), "schedule_unit", "'iter' or 'epoch'"),
            (self.amp in ("auto", "bf16", "none"), "amp", "'auto', 'bf16' or 'none'"),
            (self.batch_size >= 1, "batch_size", "a positive integer"),
            (self.lr > 0 and self.warmup_lr > 0, "lr", "positive"),
            (self.stop >= 1, "stop", "a positive number of schedule units"),
            (list(self.milestones) == sorted(self.milestones), "milestones", "increasing"),
            (min(self.log_every, 1) >= 1, "log_every", "a positive integer"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise GradflowError(f"{name}={getattr(self, name)!r} must be {want}")

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d


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
