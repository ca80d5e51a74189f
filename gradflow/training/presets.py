"""Recipes (the paper's and the official code's), the named Table 1/2/3 rows, and the lr schedule.

A preset is a dict of TrainConfig fields: a recipe plus a model, its unit and
shortcut, and the dataset. ``resolve`` layers them: config defaults, then the
recipe, then the preset, then whatever the user set explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from gradflow.errors import GradflowError, unknown
from gradflow.training.config import TrainConfig, make_config

RECIPES: dict[str, dict[str, Any]] = {
    # He et al. 2016, section 4.1 / docs/theory.md, section 7.3: 64k iterations at batch 128.
    "paper": dict(recipe="paper", batch_size=128, lr=0.1, warmup_lr=0.01, warmup_iters=400,
                  milestones=(32000, 48000), gamma=0.1, stop=64000, schedule_unit="iter",
                  momentum=0.9, nesterov=False, weight_decay=1e-4),
    # The official code's run: batch 64, 200 epochs, x0.1 at epochs 81 and 122 (counted from 1,
    # i.e. once 80 and 121 epochs are done), Nesterov momentum, no warm-up.
    "official": dict(recipe="official", batch_size=64, lr=0.1, warmup_lr=0.1, warmup_iters=0,
                     milestones=(80, 121), gamma=0.1, stop=200, schedule_unit="epoch",
                     momentum=0.9, nesterov=True, weight_decay=1e-4),
}


@dataclass(frozen=True)
class Preset:
    """One row of the paper's tables: what to train and the error the paper reports."""

    name: str
    table: str
    model: str
    options: dict
    dataset: str = "cifar10"
    recipe: str = "paper"
    paper_error: str = ""
    missing: Optional[str] = None   # why the zoo cannot build it yet, if it cannot

    def config_fields(self) -> dict[str, Any]:
        return dict(RECIPES[self.recipe], preset=self.name, model=self.model,
                    model_options=dict(self.options), dataset=self.dataset)


def presets() -> dict[str, Preset]:
    """Every named preset, Table 1 then 2 then 3 (built on call: no import-time globals).

    The rows are the paper's, from :mod:`gradflow.models.paper`: the one table the
    probe's compare sets and the figures also read.
    """
    from gradflow.models.paper import paper_rows
    return {r.name: Preset(r.name, r.table, r.model, dict(r.options), r.dataset, paper_error=r.paper_error,
                           missing=r.missing) for r in paper_rows()}


def get_preset(name: str) -> Preset:
    table = presets()
    if name not in table:
        raise unknown("preset", name, table)
    p = table[name]
    if p.missing:
        raise GradflowError(f"preset {name!r} cannot run: {p.missing}")
    return p


def resolve(preset: Optional[str] = None, recipe: Optional[str] = None,
            **overrides: Any) -> TrainConfig:
    """Config defaults <- recipe <- preset <- explicit ``overrides`` (later wins).

    ``model_options`` given in ``overrides`` are merged into the preset's, key by key.
    """
    base: dict[str, Any] = {}
    if preset is not None:
        base = get_preset(preset).config_fields()
    if recipe is not None:
        if recipe not in RECIPES:
            raise unknown("recipe", recipe, RECIPES)
        base.update(RECIPES[recipe])
    options = {**base.get("model_options", {}), **overrides.pop("model_options", {})}
    return make_config(base, **overrides, model_options=options)


# --- the lr schedule --------------------------------------------------------------------

@dataclass(frozen=True)
class LrSchedule:
    """The learning-rate schedule in iterations: warm-up length, lr drop points, stop.

    Not :class:`gradflow.tracing.Schedule`, which picks the steps a tracer records.
    """

    lr: float
    warmup_lr: float
    warmup_iters: int
    milestones: tuple[int, ...]
    gamma: float
    stop: int
    warmup_shape: str = "constant"   # "linear": warmup_lr at iteration 0, rising to lr at warmup_iters

    def lr_at(self, it: int) -> float:
        """Learning rate of iteration ``it`` (counted from 0)."""
        if it < self.warmup_iters:
            if self.warmup_shape == "linear":
                return self.warmup_lr + (self.lr - self.warmup_lr) * it / self.warmup_iters
            return self.warmup_lr
        return self.lr * self.gamma ** sum(it >= m for m in self.milestones)


def lr_schedule(cfg: TrainConfig, iters_per_epoch: int) -> LrSchedule:
    """The config's learning-rate schedule, its milestones and stop in iterations (epochs times ``iters_per_epoch``).

    Args:
        cfg: the resolved config (lr, warm-up, milestones, gamma, stop, schedule_unit).
        iters_per_epoch: training images // batch size.
    Returns:
        an :class:`LrSchedule`.
    """
    if iters_per_epoch < 1:
        raise GradflowError(f"batch_size={cfg.batch_size} is larger than the training set: "
                            "lower --batch-size or use more training images")
    k = iters_per_epoch if cfg.schedule_unit == "epoch" else 1
    return LrSchedule(cfg.lr, cfg.warmup_lr, cfg.warmup_iters, tuple(m * k for m in cfg.milestones),
                      cfg.gamma, cfg.stop * k, cfg.warmup_shape)


schedule = lr_schedule  # the old name, kept because tests/test_train.py imports it


def describe_presets() -> str:
    """The preset table as text, for --list-presets."""
    lines = [f"{'preset':45s} {'table':5s} {'model':10s} {'dataset':8s} {'paper error':11s} options"]
    for p in presets().values():
        opts = ", ".join(f"{k}={v}" for k, v in p.options.items())
        note = f"  [unavailable: {p.missing}]" if p.missing else ""
        lines.append(f"{p.name:45s} {p.table:5s} {p.model:10s} {p.dataset:8s} {p.paper_error:11s} {opts}{note}")
    return "\n".join(lines)
