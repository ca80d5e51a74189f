"""Probe a residual network's gradient flow: ``python -m gradflow.probe --model resnet1001``.

Builds the network (full pre-activation, He init, seed 0 by default), runs one
traced forward/backward on a synthetic batch (or CIFAR test images with
--data), prints a per-stage report with plain-word verdicts against eq. (5)/(8)
and writes units.csv, summary.json, config.json and figure.png into --out.
Flags map onto gradflow.probe.ProbeConfig; the logic lives there. Bad input
prints one line naming the value and the fix, and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from gradflow.cli.args import FLOAT32_MAX, SEED_MAX, Number, Parser, check_number, check_numbers
from gradflow.errors import GradflowError
from gradflow.models.units import unit_options

_Parser = Parser  # one-line errors, exit 2 (gradflow.cli.args)

# Every numeric flag's range, checked before any work (flag named in the message).
NUMBERS: dict[str, Number] = {
    "scale": Number(-FLOAT32_MAX, FLOAT32_MAX, hint="lambda; the paper uses 0 and 0.5"),
    "gate_bias": Number(-FLOAT32_MAX, FLOAT32_MAX, hint="b_g; the paper uses 0 to -7"),
    "dropout": Number(0, 1, hint="the drop ratio; the paper uses 0.5"),
    "num_classes": Number(1, 100_000, integer=True),
    "batch_size": Number(1, 10_000, integer=True, hint="a probe needs a few dozen images"),
    "batches": Number(1, 10_000, integer=True),
    "image_size": Number(8, 2048, integer=True, hint="pixels; 32 for CIFAR, 224 for ImageNet models"),
    "seed": Number(0, SEED_MAX, integer=True),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gradflow probe", description=__doc__.split("\n")[0])
    g = p.add_argument_group("what to probe")
    g.add_argument("--model", default="resnet1001",
                   help="registered name (resnet20 ... resnet1202, resnet164, resnet1001; gpt-small and the "
                        "other gpt-* take token ids, vit-cifar-* images), torchvision:NAME, timm:NAME or "
                        "hf:TYPE (a Hugging Face model built from its config: --hf-config) (default resnet1001)")
    g.add_argument("--unit", help="residual unit (Table 2): original, bn_after_addition, "
                                  "relu_before_addition, relu_only_preact, full_preact (default); "
                                  "transformers (gpt-*, vit-cifar-*): pre_ln (default), post_ln, deepnorm, "
                                  "rezero, skipinit")
    g.add_argument("--shortcut", help="shortcut (Table 1): identity (default), scale, exclusive_gate, "
                                      "shortcut_gate, conv, dropout")
    g.add_argument("--scale", "--lambda", dest="scale", type=float, help="lambda for --shortcut scale")
    g.add_argument("--scale-branch", action="store_true", default=None,
                   help="also scale F by 1 - lambda (Table 1 row 0.5/0.5)")
    g.add_argument("--gate-bias", type=float, help="b_g for the gates (default -6)")
    g.add_argument("--dropout", type=float, help="drop ratio for --shortcut dropout (default 0.5)")
    g.add_argument("--downsample", help="projection (default) or pad")
    g.add_argument("--num-classes", type=int, help="classifier outputs (default 10; 100 with CIFAR-100 data)")
    g.add_argument("--hf-config", metavar="K=V[,K=V]",
                   help="hf:TYPE models: fields of the transformers config, e.g. n_layer=12,n_embd=256 "
                        "(the model is built from it; nothing is downloaded)")
    g.add_argument("--checkpoint", metavar="PATH", help="a gradflow checkpoint or run folder to probe")
    g.add_argument("--compare", nargs="+", metavar="VARIANT",
                   help="several variants in one figure: table1, table2, or KEY=VALUE[,KEY=VALUE] "
                        "items, e.g. --compare unit=original unit=full_preact")
    g = p.add_argument_group("input and run")
    g.add_argument("--data", metavar="DIR", help="CIFAR python folder: probe on its test images "
                                                 "(default: a synthetic N(0,1) batch)")
    g.add_argument("--batch-size", type=int, help="default 16 at 32x32 (fits 20 s on 2 CPU cores), 8 at 224")
    g.add_argument("--batches", type=int, default=1, metavar="N", help="statistics over N batches (default 1)")
    g.add_argument("--image-size", type=int, help="input size (default: the model's own)")
    g.add_argument("--seq-len", type=int, help="token models: tokens per sequence (default: 128, or "
                                               "the model's positions if fewer)")
    g.add_argument("--mode", choices=["train", "eval"], default="train",
                   help="BN on batch statistics (train, default) or running statistics (eval)")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--paths", nargs="?", const=-1, type=int, metavar="MAX_LEN",
                   help="also split dE/dx at the first unit exactly by path length (Veit et al. 2016) and "
                        "report the effective path range; MAX_LEN keeps lengths 0..MAX_LEN apart (default all)")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", help="output folder (default runs/probe/<model>-<time>)")
    g.add_argument("--json", action="store_true", help="print the machine-readable report on stdout")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return p


OPTION_FLAGS = (*unit_options(), "num_classes")  # UnitSpec's fields: the one source of the option names


def hf_options(model: str, text: str) -> dict:
    """``--hf-config n_layer=12,n_embd=256`` -> the config fields of an ``hf:TYPE`` model."""
    from gradflow.cli.args import parse_key_value
    if not model.startswith("hf:"):
        raise GradflowError(f"--hf-config applies to hf:TYPE models (hf:gpt2, hf:llama, hf:bert ...); "
                            f"--model is {model!r}")
    fields = dict(parse_key_value(part, "--hf-config item") for part in text.split(",") if part.strip())
    if not fields:
        raise GradflowError(f"--hf-config {text!r}: give KEY=VALUE[,KEY=VALUE], e.g. n_layer=12,n_embd=256")
    return fields


def config_from_args(args: argparse.Namespace):
    """Map parsed flags onto a ProbeConfig."""
    from gradflow.probe import ProbeConfig, parse_compare
    check_numbers(vars(args), NUMBERS)
    if args.data is not None and not args.data.strip():
        raise GradflowError("data='' (--data) must be a CIFAR python folder; leave --data out for a "
                            "synthetic N(0,1) batch")
    compare = parse_compare(args.compare) if args.compare else None
    for label, overrides in (compare or {}).items():
        for key, value in overrides.items():
            if key in NUMBERS:
                check_number(key, value, NUMBERS[key], f"--compare {label!r}: {key}={value!r}")
    options = {k: getattr(args, k) for k in OPTION_FLAGS if getattr(args, k) is not None}
    if args.hf_config is not None:
        options.update(hf_options(args.model, args.hf_config))
    return ProbeConfig(model=args.model, options=options, checkpoint=args.checkpoint, data=args.data,
                       batch_size=args.batch_size, batches=args.batches, image_size=args.image_size,
                       seq_len=args.seq_len,
                       mode=args.mode, device=args.device, seed=args.seed, out=args.out,
                       compare=compare,
                       progress=args.progress)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = get_args_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its own one-line error (code 2) or the help (0)
        return int(e.code or 0)
    fresh, out = False, None
    try:
        from gradflow.probe import (format_report, prepare_out, report_dict, resolve_device, run_probe,
                              write_outputs)
        from gradflow.probe.output import FILES
        config = config_from_args(args)
        config.variants()                       # options checked against each other before any work
        if args.paths is not None and args.paths < -1:
            raise GradflowError(f"--paths {args.paths}: give a path length >= 0, or no number for all")
        resolve_device(config.device)           # fail before any work
        fresh = not Path(config.out or config.default_out()).expanduser().exists()
        out = prepare_out(config.out or config.default_out())
        config.out = str(out)
        result = run_probe(config)
        files = {k: str(out / v) for k, v in FILES.items()}
        report = report_dict(result, files)
        if args.paths is not None:          # the exact split by path length (gradflow.theory.paths)
            from gradflow.probe.paths import probe_paths
            report["paths"] = probe_paths(config, result, None if args.paths == -1 else args.paths)
        write_outputs(result, report, out)
    except GradflowError as e:
        if fresh and out is not None and not any(out.iterdir()):
            out.rmdir()                 # a refused probe leaves no folder it made
        print(f"gradflow probe: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False))
    else:
        print(format_report(report))
        if "paths" in report:
            from gradflow.probe.paths import format_probe_paths
            print(format_probe_paths(report["paths"]))
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    sys.exit(main(argv))


if __name__ == "__main__":
    cli()
