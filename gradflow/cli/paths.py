"""The command that writes Veit-style figures (draws with :mod:`gradflow.plot`): paths and lesions.

It computes gradflow's path tables (and lesion results) and writes the figures
with caption files; the figure functions themselves are in :mod:`gradflow.plot`
(``plot.path_length_distribution`` ... ``plot.lesion_curves``):

    python -m gradflow paths                                   # resnet110 at init into figures/
    python -m gradflow paths --lesion RUN --plain RUN --data DIR   # plus the lesion curves
    python -m gradflow paths --run RUN                         # along a training run (paths.csv)

Figures (functions of :mod:`gradflow.plot`):

* :func:`path_length_distribution` (Veit Fig. 6a): C(n, k) / 2^n.
* :func:`gradient_per_length` (Fig. 6b): the norm of one sampled path's gradient
  per k, beside the exact ||g^(k)|| / C(n, k) (the norm of the mean path).
* :func:`contribution_by_length` (Fig. 6c): sampled norm x C(n, k), beside the
  exact ||g^(k)||, which includes the cancellation between paths.
* :func:`spectrum_by_unit`: the exact share ||g_l^(k)|| / ||dE/dx_l|| per unit and k.
* :func:`contribution_over_training`: the exact ||g^(k)|| at the first unit at each
  probe of a training run (``train --probe-every N --probe-paths M``: paths.csv).
* :func:`lesion_curves` (Fig. 3, 5a, 5b): error with one unit removed, with k
  units removed, and against Kendall's tau after reordering.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import matplotlib
import pandas as pd

from gradflow.theory.paths import effective_range
from gradflow.plot import (contribution_by_length, contribution_over_training, gradient_per_length, lesion_curves,
                   path_length_distribution, spectrum_by_unit)


# --- command line: compute and write figures/ ----------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    from gradflow.cli.args import Parser
    p = Parser(prog="python -m gradflow paths", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a registered model, measured at init (default resnet110)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--samples", type=int, default=20, help="Veit's sampled paths per k (he used 1,000)")
    p.add_argument("--k-step", type=int, default=1, help="sample every k-step-th path length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="measure the paths of this trained run (on its test images, train-mode BN)")
    p.add_argument("--init", action="store_true",
                   help="with --checkpoint: also measure the run's own initialisation (rebuilt as its trainer "
                        "built it: torch.manual_seed(seed), then create_model) on the same images, as NAME-init")
    p.add_argument("--run", help="a run folder trained with --probe-every and --probe-paths: draw its "
                                 "paths.csv (the path-length split along training) and nothing else")
    p.add_argument("--lesion", help="a trained residual run folder: also draw the lesion curves")
    p.add_argument("--plain", help="a trained plain run folder (the contrast)")
    p.add_argument("--data", help="the CIFAR folder for the lesion study")
    p.add_argument("--test-images", type=int, default=0)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--out", default="figures")
    return p


def _initial(info: dict):
    """A trained run's network at initialisation, rebuilt as :mod:`gradflow.training.loop` built it."""
    import torch
    from gradflow import create_model
    torch.manual_seed(int(info["config"]["seed"]))
    return create_model(info["model"], **info["options"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    import platform
    import torch
    from gradflow import create_model
    from gradflow.errors import GradflowError
    from gradflow.utils.io import atomic_write
    from gradflow.theory.paths import compare_table
    from gradflow.tracing.paths import path_components, sample_paths
    from gradflow.utils.provenance import code_version, hardware
    matplotlib.use("Agg")
    from gradflow.cli.args import check_flags
    args = get_args_parser().parse_args(argv)
    try:
        check_flags(args)
    except GradflowError as e:
        print(f"gradflow paths: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    code = code_version()
    common = [f"command: python -m gradflow paths {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
              f"gradflow: {code.get('gradflow')}, git commit {code.get('git_commit', 'unknown')}"
              + (" with uncommitted changes" if code.get("git_dirty") else ""),
              f"torch: {torch.__version__}, python {platform.python_version()}", f"hardware: {hardware()}"]

    def save(fig, name: str, what: list[str]) -> None:
        atomic_write(out / f"{name}.png", lambda f: fig.savefig(f, format="png", dpi=160, metadata={"Software": None}))
        text = "\n".join([f"{name}: " + what[0]] + what[1:] + common) + "\n"
        atomic_write(out / f"{name}.txt", lambda f: f.write(text.encode()))
        print(f"wrote {out / name}.png")

    try:
        if args.run:
            from gradflow.runs.read import read_run
            run = read_run(args.run)
            if run.paths.empty:
                raise GradflowError(f"{args.run} has no paths.csv: train it with --probe-every N --probe-paths M "
                                    "(M: the longest path length kept apart, e.g. 20)")
            name = Path(args.run).resolve().name
            its = sorted(run.paths["iteration"].unique())
            cfg = run.config.get("config", {})
            save(contribution_over_training(run.paths, name), f"paths_over_training_{name}",
                 [f"exact ||g^(k)|| at the first unit's input by path length k at each probe of the run {args.run} "
                  f"(iterations {', '.join(map(str, its))}; k up to {cfg.get('probe_paths', '?')} apart, longer "
                  "paths summed and left out of the curves), with the effective range (shortest window of "
                  "lengths holding 90% of sum_k ||g^(k)||) per probe in the legend.",
                  f"run: {cfg.get('model')} {cfg.get('model_options', {})}, seed {cfg.get('seed')}, "
                  f"data {cfg.get('data')}; the probe's batch is the training batch of that iteration, "
                  "train-mode BN, mean cross-entropy"])
            return 0
        if args.init and not args.checkpoint:
            raise GradflowError("--init measures a trained run's own initialisation: it needs --checkpoint RUN")
        torch.manual_seed(args.seed)
        err = None
        if args.checkpoint:
            from gradflow.runs.checkpoint import load_checkpoint
            from gradflow.experiments.lesion import cifar_test_batches
            if not args.data:
                raise GradflowError("--checkpoint needs --data (the CIFAR folder of the run's test set)")
            model, info = load_checkpoint(args.checkpoint)
            model.train()
            ns = argparse.Namespace(synthetic=False, data=args.data, no_verify=True, test_images=args.batch,
                                    batch_size=args.batch)
            x, y = cifar_test_batches(info, ns, torch.device("cpu"))[0][0]
            ckpt = Path(args.checkpoint).resolve()
            from gradflow.runs.folder import read_status
            status = read_status(ckpt.parent)
            # a run folder's checkpoint.pt is named by its run; its final test error, where the
            # status is of this very checkpoint, says how well trained the network is
            name = ckpt.parent.name if ckpt.name == "checkpoint.pt" else ckpt.stem
            err = status.get("test_error") if status.get("iteration") == info.get("step") else None
            images = f"its first {args.batch} test images, train mode (BN batch statistics), mean cross-entropy"
            made = (f"the trained run {args.checkpoint} ({info.get('model')} {info.get('options')}, "
                    f"{info.get('step')} iterations"
                    + (f", test error {100 * err:.1f}%" if isinstance(err, (int, float)) else
                       ", test error not recorded for this checkpoint")
                    + f"), {images}")
            if args.model is not None:
                print(f"gradflow paths: --model {args.model} is not used: the network is the checkpoint's "
                      f"({info.get('model')})", file=sys.stderr)
        else:
            args.model = args.model or "resnet110"
            model = create_model(args.model)
            g = torch.Generator().manual_seed(args.seed)
            x = torch.randn(args.batch, 3, 32, 32, generator=g)
            y = torch.randint(0, 10, (args.batch,), generator=g)
            name = args.model
            made = (f"made at initialisation (He init, seed {args.seed}), batch {args.batch} of N(0,1) images "
                    f"[{args.batch}, 3, 32, 32], uniform labels, train mode (BN batch statistics), mean "
                    f"cross-entropy; create_model({args.model!r})")
        nets = [(model, name, made, f"{info.get('step')} training iterations" if args.checkpoint else None,
                 100 * err if args.checkpoint and isinstance(err, (int, float)) else None)]
        if args.init:
            nets.append((_initial(info).train(), f"{name}-init", f"the same run's network at initialisation (torch.manual_seed("
                         f"{info['config']['seed']}), then create_model({info['model']!r}, **{info['options']}), "
                         f"as its trainer built it), {images}",
                         None, None))
        from gradflow.experiments.veit import lesion_lines, path_lines
        for model, name, made, trained, error in nets:
            exact = path_components(model, x, y=y).table
            n = int(exact["n_units"].max())
            sampled = sample_paths(model, x, y=y, ks=range(0, n + 1, args.k_step), samples=args.samples, seed=args.seed)
            r = effective_range(exact)
            rv = effective_range(sampled.assign(unit=0, n_units=n), column="total")
            setup = f"{made}; n = {n} units; gradients at the first unit's input"
            numbers = (f"exact: 90% of sum_k ||g^(k)|| on k = {r['lo']}-{r['hi']} (peak {r['peak']}, "
                       f"{100 * r['path_share']:.3g}% of all paths); Veit's estimate: k = {rv['lo']}-{rv['hi']} "
                       f"(peak {rv['peak']}, {100 * rv['path_share']:.3g}% of paths)")
            findings = path_lines(exact, sampled, n, args.samples, trained, error)
            tag = f"paths_{name}"
            save(path_length_distribution({name: n}), f"{tag}_length_distribution",
                 [f"share of the 2^{n} paths through k residual branches, C(n,k)/2^n (Veit Fig. 6a)."])
            save(gradient_per_length(exact, sampled, name), f"{tag}_gradient_per_path",
                 ["gradient norm of one path by length k (Veit Fig. 6b): his sampling estimate "
                  f"({args.samples} sampled paths per k: k random units pass the gradient through their branch "
                  "only, the others through their shortcut only) beside the exact ||g^(k)|| / C(n,k).", setup,
                  *findings])
            save(contribution_by_length(exact, sampled, name), f"{tag}_contribution",
                 ["gradient by path length (Veit Fig. 6c): sampled path norm x C(n,k) beside the exact ||g^(k)||, "
                  "which includes the cancellation between paths.", numbers, setup, *findings])
            save(spectrum_by_unit(exact, name), f"{tag}_spectrum",
                 ["exact ||g_l^(k)|| / ||dE/dx_l|| for every unit l and path length k.", setup])
            atomic_write(out / f"{tag}.csv", lambda f: f.write(compare_table(exact, sampled).to_csv(index=False).encode()))
        if args.lesion:
            from gradflow.runs.checkpoint import load_checkpoint
            from gradflow.experiments.lesion import cifar_test_batches, error_rate, lesion_study, plain_blocks
            if not args.data:
                raise GradflowError("--lesion needs --data (the CIFAR folder of the runs' test set)")
            ns = argparse.Namespace(synthetic=False, data=args.data, no_verify=True, test_images=args.test_images,
                                    batch_size=500)
            m, info = load_checkpoint(args.lesion)
            batches, described = cifar_test_batches(info, ns, torch.device("cpu"))
            results = [lesion_study(m, batches, draws=args.draws, seed=args.seed, network=info.get("model", ""))]
            runs = [f"residual: {args.lesion} (trained {info.get('step')} iterations)"]
            if args.plain:
                p, pinfo = load_checkpoint(args.plain)
                results.append(lesion_study(p, batches, blocks=plain_blocks(p), draws=args.draws, seed=args.seed,
                                            network=pinfo.get("model", "")))
                runs.append(f"plain: {args.plain} (trained {pinfo.get('step')} iterations)")
            if args.init:    # the run's network at initialisation (measured by the paths above)
                init_err = error_rate(_initial(info), batches)   # fresh: the paths moved BN's running stats
                classes = int(info.get("options", {}).get("num_classes", 10))
                chance = 100.0 * (1 - 1 / classes)
                runs.append(f"the same network at initialisation: {init_err:.1f}% test error on these images "
                            f"(chance {chance:.0f}%); no lesion is drawn for it"
                            + (": removing a unit from a network at chance cannot test Veit's Fig. 3"
                               if init_err >= chance - 5 else ""))
            save(lesion_curves(results), "lesion_curves",
                 ["test error with one unit's branch removed, k random units removed "
                  f"({args.draws} draws per k) and same-stage units swapped (Veit Fig. 3, 5a, 5b).",
                  f"data: {described}", *runs,
                  *[f"{r.network}: intact {r.baseline:.2f}%; " + "; ".join(r.notes) for r in results],
                  *lesion_lines(results[0].single, results[0].baseline, results[0].network or "the residual net",
                                f"trained {info.get('step')} iterations", results[0].intact_correct,
                                results[0].single_correct, seed=args.seed)])
            atomic_write(out / "lesion_curves.csv", lambda f: f.write(
                pd.concat([r.table() for r in results]).to_csv(index=False).encode()))
    except GradflowError as e:
        print(f"gradflow paths: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
