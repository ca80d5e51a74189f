"""Recipes (the paper's and the official code's), the named Table 1/2/3 rows, and the lr schedule.

A preset is a dict of TrainConfig fields: a recipe plus a model, its unit and
shortcut, and the dataset. ``resolve`` layers them: config defaults, then the
recipe, then the preset, then whatever the user set explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..errors import GradflowError, unknown
from .config import TrainConfig, make_config

RECIPES: dict[str, dict[str, Any]] = {
    # He et al. 2016, section 4.1 / PAPER.md section 5: 64k iterations at batch 128.
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


def _table1() -> list[Preset]:
    orig = dict(unit="original")
    rows = [("original", dict(shortcut="identity"), "6.61"),
            ("scale-0", dict(shortcut="scale", scale=0.0), "fail"),
            ("scale-0.5", dict(shortcut="scale", scale=0.5), "fail"),
            ("scale-0.5-0.5", dict(shortcut="scale", scale=0.5, scale_branch=True), "12.35"),
            ("conv-shortcut", dict(shortcut="conv"), "12.22"),
            ("dropout-shortcut", dict(shortcut="dropout", dropout=0.5), "fail")]
    for b in range(0, -8, -1):
        err = {-6: "8.70", -7: "9.81"}.get(b, "fail")
        rows.append((f"exclusive-gate-b{b}", dict(shortcut="exclusive_gate", gate_bias=float(b)), err))
    rows += [("shortcut-gate-b0", dict(shortcut="shortcut_gate", gate_bias=0.0), "12.86"),
             ("shortcut-gate-b-6", dict(shortcut="shortcut_gate", gate_bias=-6.0), "6.91")]
    return [Preset(f"table1-{n}", "1", "resnet110", {**orig, **o}, paper_error=e) for n, o, e in rows]


def _table2() -> list[Preset]:
    errors = {"original": ("6.61", "5.93"), "bn_after_addition": ("8.17", "6.50"),
              "relu_before_addition": ("7.84", "6.14"), "relu_only_preact": ("6.71", "5.91"),
              "full_preact": ("6.37", "5.46")}
    return [Preset(f"table2-{m}-{u}", "2", m, dict(unit=u), paper_error=e[i])
            for i, m in enumerate(("resnet110", "resnet164")) for u, e in errors.items()]


def _table3() -> list[Preset]:
    rows = [("cifar10", "resnet110", "6.61", "6.37"), ("cifar10", "resnet164", "5.93", "5.46"),
            ("cifar10", "resnet1001", "7.61", "4.92"), ("cifar100", "resnet164", "25.16", "24.33"),
            ("cifar100", "resnet1001", "27.82", "22.71")]
    out = []
    for ds, m, e_orig, e_pre in rows:
        for unit, err in (("original", e_orig), ("full_preact", e_pre)):
            tag = "original" if unit == "original" else "preact"
            out.append(Preset(f"table3-{ds}-{m}-{tag}", "3", m,
                              dict(unit=unit, num_classes=10 if ds == "cifar10" else 100),
                              dataset=ds, paper_error=err))
    why = "the zoo has no unit with 1-layer skips yet (one 3x3 conv per unit)"
    for unit, err in (("original", "9.90"), ("full_preact", "8.91")):
        tag = "original" if unit == "original" else "preact"
        out.append(Preset(f"table3-cifar10-resnet110-1layer-{tag}", "3", "resnet110",
                          dict(unit=unit), paper_error=err, missing=why))
    return out


def presets() -> dict[str, Preset]:
    """Every named preset, Table 1 then 2 then 3 (built on call: no import-time globals)."""
    return {p.name: p for p in _table1() + _table2() + _table3()}


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


# --- the schedule -----------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """The recipe in iterations: warm-up length, lr drop points, stop."""

    lr: float
    warmup_lr: float
    warmup_iters: int
    milestones: tuple[int, ...]
    gamma: float
    stop: int

    def lr_at(self, it: int) -> float:
        """Learning rate of iteration ``it`` (counted from 0)."""
        if it < self.warmup_iters:
            return self.warmup_lr
        return self.lr * self.gamma ** sum(it >= m for m in self.milestones)


def schedule(cfg: TrainConfig, iters_per_epoch: int) -> Schedule:
    """Convert the config's milestones and stop to iterations (epochs times ``iters_per_epoch``)."""
    if iters_per_epoch < 1:
        raise GradflowError(f"batch_size={cfg.batch_size} is larger than the training set: "
                            "lower --batch-size or use more training images")
    k = iters_per_epoch if cfg.schedule_unit == "epoch" else 1
    return Schedule(cfg.lr, cfg.warmup_lr, cfg.warmup_iters, tuple(m * k for m in cfg.milestones),
                    cfg.gamma, cfg.stop * k)


def describe_presets() -> str:
    """The preset table as text, for --list-presets."""
    lines = [f"{'preset':45s} {'table':5s} {'model':10s} {'dataset':8s} {'paper error':11s} options"]
    for p in presets().values():
        opts = ", ".join(f"{k}={v}" for k, v in p.options.items())
        note = f"  [unavailable: {p.missing}]" if p.missing else ""
        lines.append(f"{p.name:45s} {p.table:5s} {p.model:10s} {p.dataset:8s} {p.paper_error:11s} {opts}{note}")
    return "\n".join(lines)
