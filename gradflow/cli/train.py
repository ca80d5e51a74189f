"""Command line for the CIFAR trainer: ``python -m gradflow train --model resnet164 --data DIR``.

Several GPUs or machines: ``torchrun --nproc_per_node N -m gradflow train ...``.
Flags map one to one onto gradflow.training.TrainConfig; the logic lives there.
Exit codes (gradflow.cli.args): 0 finished, 1 diverged or failed, 2 bad input,
3 crashed, 75 stopped by --halt-at, 130 SIGINT, 143 SIGTERM.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Optional, Sequence

from gradflow.cli import args as _cli
from gradflow.errors import GradflowError

# --smoke: the whole path (data, steps, eval, checkpoints, logs) in seconds.
SMOKE = dict(batch_size=32, stop=30, schedule_unit="iter", warmup_iters=5, milestones=(20, 25),
             log_every=5, eval_every=10, checkpoint_every=10, train_subset=1024, test_subset=512)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def get_args_parser() -> argparse.ArgumentParser:
    p = _cli.Parser(prog="gradflow train", description=__doc__.split("\n")[0],
                   argument_default=argparse.SUPPRESS)
    a = p.add_argument
    g = p.add_argument_group("what to train")
    g.add_argument("--model", help="registered model name (default resnet110)")
    g.add_argument("--preset", help="a Table 1/2/3 row (see --list-presets)")
    g.add_argument("--recipe", help="'paper' (default) or 'official'")
    g.add_argument("--unit", help="residual unit type (Table 2)")
    g.add_argument("--shortcut", help="shortcut type (Table 1)")
    g.add_argument("--model-opt", type=_cli.key_value_arg(), action="append", metavar="KEY=VALUE",
                   help="any other create_model option, e.g. scale=0.5 or gate_bias=-6")
    g.add_argument("--dataset", choices=["cifar10", "cifar100"])
    g.add_argument("--data", help="folder holding the CIFAR tarball or its extracted folder")
    g.add_argument("--download", action="store_true", help="fetch CIFAR through torchvision")
    g.add_argument("--no-verify", dest="verify_data", action="store_false",
                   help="skip the md5 check (synthetic or re-packed data)")
    g.add_argument("--synthetic", action="store_true",
                   help="train on generated CIFAR-shaped data, not --data (the default of --smoke "
                        "without --data)")
    g = p.add_argument_group("recipe (overrides the recipe and preset)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--warmup-lr", type=float)
    g.add_argument("--warmup-iters", type=int)
    g.add_argument("--warmup-shape", choices=["constant", "linear"],
                   help="constant (the paper's): --warmup-lr throughout the warm-up; linear: from --warmup-lr "
                        "up to --lr")
    g.add_argument("--milestones", type=_ints, help="comma-separated, in --schedule-unit")
    g.add_argument("--gamma", type=float)
    g.add_argument("--stop", type=int, help="run length, in --schedule-unit")
    g.add_argument("--schedule-unit", choices=["iter", "epoch"])
    g.add_argument("--momentum", type=float)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction)
    g.add_argument("--weight-decay", type=float)
    g = p.add_argument_group("how to run")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="'auto', 'cpu', 'cuda', 'cuda:1'")
    g.add_argument("--amp", choices=["auto", "bf16", "none"],
                   help="auto (default): bf16 autocast where the hardware does bf16 "
                        "(Ampere+ GPUs, AVX512-BF16/AMX CPUs), else float32")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction)
    g.add_argument("--compile", action="store_true")
    g.add_argument("--deterministic", action="store_true")
    g.add_argument("--sync-bn", action="store_true")
    g = p.add_argument_group("records")
    for flag in ("--log-every", "--eval-every", "--checkpoint-every", "--probe-every"):
        g.add_argument(flag, type=int, metavar="N")
    g.add_argument("--probe-paths", type=int, metavar="N",
                   help="at each probe also split dE/dx_l by path length k = 0..N (longer paths summed as "
                        "k = -1) into paths.csv; N >= the unit count gives every length")
    g.add_argument("--fail-error", type=float)
    g.add_argument("--out-dir")
    g.add_argument("--run-name")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--train-subset", type=int, metavar="N")
    g.add_argument("--test-subset", type=int, metavar="N")
    g.add_argument("--halt-at", type=int, metavar="ITER", help="stop there with a checkpoint")
    a("--resume", metavar="RUN", help="continue the run folder (or checkpoint) RUN")
    a("--smoke", action="store_true", help="a few tiny iterations: test the whole path in seconds "
                                          "(on generated data unless --data is given)")
    a("--list-presets", action="store_true", help="print the named presets and exit")
    return p


def config_from_args(args: argparse.Namespace):
    """Map parsed flags onto a TrainConfig (or the saved config of --resume)."""
    from gradflow.training import resolve, resume_config
    given = dict(vars(args))
    for flag in ("smoke", "list_presets"):
        given.pop(flag, None)
    resume = given.pop("resume", None)
    options = dict(given.pop("model_opt", []))
    for key in ("unit", "shortcut"):
        if key in given:
            options[key] = given.pop(key)
    if resume is not None:
        return resume_config(resume, **given), resume
    if options:
        given["model_options"] = options
    smoke = {k: v for k, v in SMOKE.items() if k not in given} if getattr(args, "smoke", False) else {}
    if smoke and "data" not in given and not given.get("download"):
        smoke["synthetic"] = True  # a smoke test needs no CIFAR; the trainer says it uses generated data
    return resolve(given.pop("preset", None), given.pop("recipe", None), **smoke, **given), None


def main(args: argparse.Namespace) -> int:
    """Run the parsed command; returns the exit code (see gradflow.cli.args)."""
    from gradflow.training import TrainingDiverged, describe_presets, run_training
    from gradflow.training.signals import Interrupted
    from gradflow.training.steps import describe_error
    if getattr(args, "list_presets", False):
        print(describe_presets())
        return _cli.EXIT_OK
    try:
        config, resume = config_from_args(args)
        outcome = run_training(config, resume=resume)
    except GradflowError as e:
        print(f"gradflow train: error: {e}", file=sys.stderr)
        return _cli.EXIT_BAD_INPUT
    except TrainingDiverged as e:
        print(f"gradflow train: {e}", file=sys.stderr)
        return _cli.EXIT_FAILED
    except Interrupted as e:
        return _cli.EXIT_SIGTERM if e.signal == "SIGTERM" else _cli.EXIT_SIGINT
    except KeyboardInterrupt:
        print("gradflow train: interrupted (SIGINT) before training started", file=sys.stderr)
        return _cli.EXIT_SIGINT
    except OSError as e:
        print(f"gradflow train: crashed: {describe_error(e)}; status.json says crashed; "
              "--resume continues from the last checkpoint", file=sys.stderr)
        return _cli.EXIT_CRASHED
    except Exception as e:  # noqa: BLE001  (a bug: show where, then say what it means for the run)
        traceback.print_exc()
        print(f"gradflow train: crashed: {describe_error(e)}; status.json says crashed; "
              "--resume continues from the last checkpoint", file=sys.stderr)
        return _cli.EXIT_CRASHED
    if os.environ.get("RANK", "0") == "0":
        if outcome.status == "fail":
            from gradflow.training.steps import last_test_error
            err = last_test_error(outcome.run_dir)
            shown = f"{err:.4f}" if isinstance(err, float) else "unknown"
            print(f"gradflow train: the run finished with test error {shown}, above --fail-error "
                  f"{config.fail_error:g}: status fail, exit 1", file=sys.stderr)
        print(f"gradflow train: run folder {outcome.run_dir}")
    return outcome.exit_code


def cli(argv: Optional[Sequence[str]] = None) -> None:
    from gradflow.training.signals import exit_on_signals, hold_signals_if_stopped
    exit_on_signals()
    code = main(get_args_parser().parse_args(argv))
    hold_signals_if_stopped()   # a late second signal must not kill the interpreter's shutdown
    sys.exit(code)


if __name__ == "__main__":
    cli()
