"""What every gradflow command line shares: one-line argparse errors, KEY=VALUE flags, one rule per flag.

The checks themselves (exit codes, numbers, model options, the device) live in
:mod:`gradflow.utils.checks`, where the library uses them too; they are re-exported here
for the command lines.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

from gradflow.errors import GradflowError
from gradflow.utils.checks import (  # noqa: F401  (re-exported for the command lines)
    EXIT_BAD_INPUT, EXIT_CRASHED, EXIT_FAILED, EXIT_HALTED, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM,
    FLOAT32_MAX, SEED_MAX, STOP, Number, check_model_options, check_number, check_numbers, flag,
    parse_key_value, resolve_device)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2, no usage block): the shape of every other gradflow error."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def key_value_arg(what: str = "--model-opt") -> Callable[[str], tuple[str, Any]]:
    """An argparse ``type=`` for KEY=VALUE flags, through :func:`parse_key_value`."""
    def parse(text: str) -> tuple[str, Any]:
        try:
            return parse_key_value(text, what)
        except GradflowError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


# One rule per flag that several commands take: each command checks its parsed flags through
# check_flags, so ``--seed -1`` or ``--batch 0`` is refused in the same words everywhere.
FLAGS = {
    "seed": Number(0, SEED_MAX, integer=True, hint="a seed is a non-negative integer"),
    "batch": Number(1, 2 ** 20, integer=True, hint="the number of images per traced batch"),
    "batch_size": Number(1, 2 ** 20, integer=True),
    "deep_batch": Number(1, 2 ** 20, integer=True, hint="the number of images per ResNet-1001 trace"),
    "k_step": Number(1, 10 ** 6, integer=True, hint="1 draws every path length"),
    "samples": Number(1, 10 ** 7, integer=True),
    "draws": Number(1, 10 ** 6, integer=True),
    "test_images": Number(0, 10 ** 7, integer=True, hint="0 means the whole test set"),
    "jobs": Number(1, 4096, integer=True, hint="concurrent runs on the CPU"),
    "threads": Number(1, 4096, integer=True, hint="CPU threads per run"),
    "seeds": Number(1, 10 ** 4, integer=True, hint="seeds per row"),
    "stop": STOP,
    "replicates": Number(1, 10 ** 6, integer=True, hint="bootstrap replicates; 2000 is the default"),
}


def check_flags(args: argparse.Namespace, out_flags: tuple[str, ...] = ("out",)) -> None:
    """Check every flag of ``args`` that :data:`FLAGS` has a rule for, and the output folders.

    Raises a GradflowError naming the flag, the value and what is allowed.
    """
    values = {k: v for k, v in vars(args).items() if k in FLAGS and v is not None}
    check_numbers(values, FLAGS)
    for name in out_flags:
        value = getattr(args, name, None)
        if value is not None:
            check_out_dir(value, flag(name))


def check_out_dir(path: Any, name: str = "--out") -> None:
    """An output folder must be named and must not lie inside a file (checked before anything is made)."""
    from pathlib import Path
    if not str(path).strip():
        raise GradflowError(f"{name} {str(path)!r} is empty: name the output folder (e.g. {name} figures)")
    p = Path(path)
    for where in (p, *p.parents):
        if where.exists():
            if not where.is_dir():
                raise GradflowError(f"{name} {str(path)!r}: {where} is a file, not a folder: pass a folder "
                                    "path that is not inside a file")
            return
