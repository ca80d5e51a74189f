"""``python -m gradflow <command> [options]``: every gradflow command line from one entry point.

    python -m gradflow probe --model resnet1001          # also: python -m gradflow.probe
    python -m gradflow train --model resnet164 --data DIR
    python -m gradflow figures | experiment | lesion | paths | xiong ...

``python -m gradflow <command> --help`` lists a command's options.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

# command -> (module, what it does); each module's ``cli(argv)`` (or ``main(argv)``) runs it
COMMANDS = {
    "probe": ("gradflow.cli.probe", "one traced step of a network at init (or a checkpoint), reported"),
    "train": ("gradflow.cli.train", "the CIFAR trainer (torchrun -m gradflow train ... for several GPUs)"),
    "figures": ("gradflow.cli.figures", "regenerate the paper-style figures in figures/"),
    "experiment": ("gradflow.cli.experiment", "the paper's Table 1/2/3 experiments: rows x seeds of runs"),
    "lesion": ("gradflow.cli.lesion", "Veit et al.'s lesion study on a trained checkpoint"),
    "paths": ("gradflow.cli.paths", "Veit-style path-length figures of a network or a training run"),
    "trainability": ("gradflow.cli.trainability", "predict trainability from one traced step at init, checked against training"),
    "xiong": ("gradflow.cli.xiong", "Xiong et al. 2020 Theorem 1 (post-LN vs pre-LN) measured"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m gradflow <command> [options]   (python -m gradflow <command> --help)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"gradflow: unknown command {name!r}{hint} (one of: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"gradflow {name}", *rest]
    run = getattr(module, "cli", None)
    if run is not None:
        run(rest)          # exits with the command's code
        return 0
    return int(module.main(rest) or 0)


def main_exit() -> None:
    """The ``gradflow`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
