"""What the library and every command line share: exit codes, numeric checks, KEY=VALUE options, the device.

One place for each, so ``gradflow.train(...)``, ``gradflow train`` and ``gradflow probe``
refuse the same bad value with the same words: the setting's name and flag, the value,
what is allowed. The command lines' argparse pieces are in :mod:`gradflow.cli.args`.

Exit codes (documented in the README, held to by the tests):

====  ==========================================================================
0     finished (status ``ok``)
1     the run ended without success: diverged, or finished above ``--fail-error``
2     bad input (a flag, a data file, a run folder); nothing was trained
3     crashed (an unexpected error, a full disk, ...): status ``crashed``; resume
75    stopped on purpose by ``--halt-at`` (EX_TEMPFAIL: "try again"); resume
130   interrupted by SIGINT (128 + 2); resume
143   interrupted by SIGTERM (128 + 15); resume
====  ==========================================================================
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from gradflow.errors import GradflowError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_CRASHED = 3
EXIT_HALTED = 75
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

SEED_MAX = 2 ** 32 - 1      # numpy's limit; gradflow derives per-epoch seeds from it (data.epoch_plan)
FLOAT32_MAX = 3.4028234663852886e38


def flag(name: str) -> str:
    """``"weight_decay"`` -> ``"--weight-decay"``."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Number:
    """What a numeric flag may hold: bounds (inclusive unless ``*_open``), integer or real, finite."""

    low: Optional[float] = None
    high: Optional[float] = None
    integer: bool = False
    low_open: bool = False
    hint: str = ""          # a few words on the fix, e.g. "the paper uses 0.9"

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.low == -FLOAT32_MAX and self.high == FLOAT32_MAX:
            return "a number finite in float32 (|x| < 3.4e38)"
        def num(x: float) -> str:
            return str(int(x)) if self.integer else f"{x:g}"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {num(self.low)}")
        if self.high is not None:
            parts.append(f"<= {num(self.high)}")
        return kind + (" " + " and ".join(parts) if parts else "")


# a run's length: the paper trains 64,000 iterations; a billion is a typo, not a plan
STOP = Number(1, 10 ** 9, integer=True, hint="iterations (or epochs); the paper trains 64000 iterations")


def check_number(name: str, value: Any, rule: Number, label: Optional[str] = None) -> None:
    """Raise a GradflowError naming ``--name`` unless ``value`` obeys ``rule``. ``None`` passes (unset).

    Args:
        name: the config field (``weight_decay``); the message shows it and its flag.
        value: the value given.
        rule: bounds and kind.
        label: how to name it instead of ``name=value (--name)``.
    """
    if value is None:
        return
    what = label or f"{name}={value!r} ({flag(name)})"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and rule.integer:
        ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if ok:
        ok = math.isfinite(value)
    if ok and rule.low is not None:
        ok = value > rule.low if rule.low_open else value >= rule.low
    if ok and rule.high is not None:
        ok = value <= rule.high
    if not ok:
        hint = f" ({rule.hint})" if rule.hint else ""
        raise GradflowError(f"{what} must be {rule.describe()}{hint}")


def check_numbers(values: Mapping[str, Any], rules: Mapping[str, Number]) -> None:
    """:func:`check_number` for every ``rules`` key present in ``values``."""
    for name, rule in rules.items():
        if name in values:
            v = values[name]
            if isinstance(v, (tuple, list)):
                for item in v:
                    check_number(name, item, rule, f"{name}={list(v)!r} ({flag(name)}): {item!r}")
            else:
                check_number(name, v, rule)


def parse_key_value(text: str, what: str = "--model-opt") -> tuple[str, Any]:
    """``"scale=0.5"`` -> ``("scale", 0.5)``: the one KEY=VALUE parser of every gradflow CLI.

    Keys may use dashes (``gate-bias``) and ``lambda`` for ``scale`` (the paper's
    name); values are Python literals where they parse (``0.5``, ``True``,
    ``-6``), else strings (``original``).
    """
    key, eq, value = text.strip().partition("=")
    key = key.strip().replace("-", "_")
    if not eq or not key:
        raise GradflowError(f"{what} {text!r} is not KEY=VALUE (e.g. scale=0.5 or unit=original)")
    if key == "lambda":
        key = "scale"
    value = value.strip()
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return key, value
    if value.lower() in ("nan", "inf", "-inf"):  # literal_eval never gets here; float('nan') would
        return key, value
    return key, parsed


def check_model_options(options: Mapping[str, Any], defaults: Mapping[str, Any],
                        where: Callable[[str], str] = lambda k: f"--model-opt {k}") -> None:
    """Each option's value must be of its default's kind: a finite float32 number, an int, a bool, a str.

    ``defaults`` is ``gradflow.model_options(model)``; options it does not list
    are left to ``create_model`` (which names the options that exist).
    ``where(key)`` names the flag in the message.
    """
    for key, value in options.items():
        if key not in defaults or defaults[key] is None:
            continue
        default = defaults[key]
        shown = f"{where(key)}={value!r}"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise GradflowError(f"{shown} must be True or False")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise GradflowError(f"{shown} must be an integer (default {default!r})")
            check_number(key, value, Number(1 if key == "num_classes" else None, 2 ** 31 - 1,
                                            integer=True), shown)
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise GradflowError(f"{shown} must be a number (default {default!r})")
            check_number(key, value, Number(-FLOAT32_MAX, FLOAT32_MAX,
                                            hint="finite in float32, where the model computes"), shown)
        elif isinstance(default, str) and not isinstance(value, str):
            raise GradflowError(f"{shown} must be a name (default {default!r})")


def resolve_device(name: str, allowed: tuple[str, ...] = ("cpu", "cuda", "mps")) -> torch.device:
    """``auto`` -> cuda if visible else cpu; a device that is not there is a GradflowError.

    Args:
        name: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        allowed: the device types the caller can run on.

    Returns:
        The torch.device, checked to exist on this machine.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choices = ", ".join(["auto"] + [a + (" or cuda:N" if a == "cuda" else "") for a in allowed])
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise GradflowError(f"device={name!r} (--device) is not a device name: use {choices}") from None
    if dev.type not in allowed:
        raise GradflowError(f"device={name!r} (--device): gradflow runs on {choices}")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise GradflowError(f"device={name!r} (--device) but no CUDA device is visible: use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise GradflowError(f"device={name!r} (--device) but only {n} CUDA device(s) are visible "
                                f"(cuda:0..cuda:{n - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise GradflowError(f"device={name!r} (--device) but MPS is not available here: use --device cpu")
    return dev
