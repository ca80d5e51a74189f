"""The probe's configuration: one dataclass, and the named ``--compare`` sets.

A probe is one traced forward/backward (or ``batches`` of them) of a freshly
built, He-initialised network at a fixed seed; :class:`ProbeConfig` says which
network, which input and where the results go. ``compare`` runs the same probe
once per variant (option overrides on the base model) and draws them together.
"""
from __future__ import annotations

import ast
import datetime as _dt
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

from gradflow.errors import GradflowError, unknown
from gradflow.models.paper import compare_set

# The paper's variant sets, derived from the one table in gradflow.models.paper.
TABLE1: dict[str, dict[str, Any]] = compare_set("table1")   # shortcut variants on original units
TABLE2: dict[str, dict[str, Any]] = compare_set("table2")   # where the activation goes
COMPARE_SETS = {"table1": TABLE1, "table2": TABLE2}


@dataclass
class ProbeConfig:
    """What to probe and how. Fields left ``None`` are resolved from the model (see ``resolve``)."""

    model: str = "resnet1001"           # registered name, "torchvision:NAME" or "timm:NAME"
    options: dict = field(default_factory=dict)  # create_model keywords (unit, shortcut, scale, ...)
    checkpoint: Optional[str] = None    # a gradflow checkpoint (or run folder): architecture and weights
    data: Optional[str] = None          # CIFAR python folder; None: a synthetic N(0, 1) batch
    batch_size: Optional[int] = None    # None: 16 at 32x32 (resnet1001 in < 20 s on 2 cores), 8 above
    batches: int = 1                    # statistics over this many batches (one traced step each)
    image_size: Optional[int] = None    # None: the model's own (32 zoo, 224 torchvision, timm's cfg)
    seq_len: Optional[int] = None       # token models: tokens per sequence (None: min(128, the model's))
    mode: str = "train"                 # BN on batch statistics, as in training and docs/theory.md, section 6
    device: str = "auto"                # "auto": cuda when visible, else cpu
    seed: int = 0                       # torch.manual_seed before building; the batch draws from it too
    out: Optional[str] = None           # None: runs/probe/<model>-<time>
    compare: Optional[dict] = None      # label -> option overrides; None: a single probe
    progress: bool = True               # a progress bar over --compare variants (stderr)

    def __post_init__(self) -> None:
        if self.mode not in ("train", "eval"):
            raise GradflowError(f"mode={self.mode!r} is not 'train' or 'eval'")
        if self.batches < 1:
            raise GradflowError(f"batches={self.batches!r} must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise GradflowError(f"batch_size={self.batch_size!r} must be >= 1")
        if self.seq_len is not None and self.seq_len < 1:
            raise GradflowError(f"seq_len={self.seq_len!r} must be >= 1 token")
        if self.image_size is not None and self.image_size < 8:
            raise GradflowError(f"image_size={self.image_size!r} must be >= 8 pixels")
        if self.checkpoint is not None and self.options:
            raise GradflowError(f"--checkpoint fixes the architecture; drop {sorted(self.options)} "
                                "(the checkpoint's own options are used)")

    def variants(self) -> dict[str, "ProbeConfig"]:
        """label -> the config of one probe: just this one, or one per ``compare`` entry.

        An option that has no effect on its variant (``scale`` without
        ``shortcut="scale"``) is an error naming what it needs (:func:`check_options_apply`).
        """
        if not self.compare:
            check_options_apply(self.model, self.options)
            return {self.label(): self}
        if self.checkpoint is not None:
            raise GradflowError("--compare builds fresh variants of --model; it cannot be "
                                "combined with --checkpoint")
        out = {}
        for label, overrides in self.compare.items():
            overrides = dict(overrides)
            model = overrides.pop("model", self.model)
            out[label] = replace(self, model=model, options={**self.options, **overrides}, compare=None)
            check_options_apply(model, out[label].options, only=set(overrides), where=f"--compare {label!r}: ")
        for name in self.options:    # a base option must reach at least one variant
            reads = [label for label, cfg in out.items() if name not in self.compare[label]
                     and name not in {n for n, _ in _inapplicable(cfg.model, cfg.options)}]
            if reads:
                continue
            if all(name in o for o in self.compare.values()):
                raise GradflowError(f"--{name.replace('_', '-')} {self.options[name]!r} has no effect: every "
                                    "--compare variant sets its own; drop it")
            first = next(label for label in out if name not in self.compare[label])
            check_options_apply(out[first].model, out[first].options, only={name},
                                where=f"--compare {first!r} (and every variant that does not set it): ")
        return out

    def label(self) -> str:
        if self.checkpoint is not None:
            return f"checkpoint {self.checkpoint}"
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.model}" + (f" ({opts})" if opts else "")

    def default_out(self) -> str:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = "compare" if self.compare else (self.model if self.checkpoint is None else "checkpoint")
        return f"runs/probe/{name.replace(':', '-').replace('/', '-')}-{stamp}"

    def as_dict(self) -> dict:
        return asdict(self)


FLAGS = {"scale": "--scale/--lambda"}   # the CLI's names where they are not --NAME


def _inapplicable(model: str, options: dict) -> list[tuple[str, dict]]:
    """The options that have no effect on the zoo model ``model`` (third-party models take none)."""
    if ":" in model or not options:
        return []
    from gradflow.models.registry import model_options
    from gradflow.models.transformer import TransformerSpec
    from gradflow.models.units import UnitSpec, inapplicable
    try:
        defaults = model_options(model)
    except GradflowError:    # an unknown model is reported where it is built, with close matches
        return []
    return inapplicable(options, defaults, (UnitSpec, TransformerSpec))


def check_options_apply(model: str, options: dict, only: Optional[set] = None, where: str = "") -> None:
    """Refuse an option that has no effect on ``model`` with ``options``: one line naming what it needs.

    The rules come from the unit config dataclasses' fields (``applies_with``).
    Args:
        only: check just these option names (a --compare variant's own overrides).
        where: a prefix naming the variant.
    """
    from gradflow.models.registry import model_options
    for name, need in _inapplicable(model, options):
        if only is not None and name not in only:
            continue
        merged = {**model_options(model), **options}
        key, values = next(iter(need.items()))
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        raise GradflowError(
            f"{where}{flag} {options[name]!r} has no effect on {model} with {key}={merged[key]!r}: it applies "
            f"with {' or '.join(f'{key}={v!r}' for v in values)}; add --{key.replace('_', '-')} {values[0]} or "
            f"drop {flag.split('/')[0]}")


def parse_compare(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["table1"]`` or ``["unit=original", "unit=full_preact,shortcut=scale,scale=0.5"]`` -> label -> overrides.

    Named sets (``table1``, ``table2``) and KEY=VALUE[,KEY=VALUE...] items may be mixed.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        item = item.strip()
        if "=" not in item:
            if item.lower() not in COMPARE_SETS:
                raise unknown("--compare set", item, COMPARE_SETS)
            out.update({k: dict(v) for k, v in COMPARE_SETS[item.lower()].items()})
            continue
        overrides = dict(parse_option(part) for part in item.split(",") if part.strip())
        out[item] = overrides
    if not out:
        raise GradflowError("--compare needs at least one variant: a set (table1, table2) "
                            "or KEY=VALUE items such as unit=original unit=full_preact")
    return out


def parse_option(text: str) -> tuple[str, Any]:
    """``"scale=0.5"`` -> ("scale", 0.5): gradflow.cli.args's one KEY=VALUE parser (dashes, ``lambda``)."""
    from gradflow.utils.checks import parse_key_value
    return parse_key_value(text, "--compare item")
