"""Veit-style figures: path lengths, gradient per path length, contribution by length, lesions.

Functions take gradflow's tables and return matplotlib Figures (nothing is
written); ``python -m gradflow.pathplots`` computes the tables and writes the
figures with caption files:

    python -m gradflow.pathplots                                   # resnet110 at init into figures/
    python -m gradflow.pathplots --lesion RUN --plain RUN --data DIR   # plus the lesion curves
    python -m gradflow.pathplots --run RUN                         # along a training run (paths.csv)

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
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import matplotlib
import numpy as np
import pandas as pd

from .paths import effective_range, path_counts


@contextmanager
def _style():
    import matplotlib.pyplot as plt
    with plt.rc_context({"axes.grid": True, "grid.linestyle": ":", "grid.alpha": 0.6, "legend.frameon": False,
                         "axes.spines.top": False, "axes.spines.right": False, "font.size": 9}):
        yield plt


def path_length_distribution(ns: dict):
    """Share of the 2^n paths through k branches, one curve per network ({label: n units})."""
    with _style() as plt:
        fig, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
        for label, n in ns.items():
            c = path_counts(n)
            ax.bar(c["k"], c["share"], alpha=0.55, label=f"{label} (n = {n})")
        ax.set(xlabel="path length k (residual branches passed)", ylabel="share of all paths",
               title="Path lengths: Binomial(n, 1/2)")
        ax.legend()
    return fig


def gradient_per_length(exact: pd.DataFrame, sampled: Optional[pd.DataFrame] = None, label: str = ""):
    """Gradient norm of one path per length k at the first unit's input, log scale (Veit Fig. 6b)."""
    t = _first_unit(exact)
    with _style() as plt:
        fig, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
        ax.plot(t["k"], t["norm"] / t["n_paths"], "-", color="C0", label="exact: ||g^(k)|| / C(n,k) (mean path)")
        if sampled is not None and len(sampled):
            s = sampled.sort_values("k")
            ax.errorbar(s["k"], s["path_norm"], yerr=s["path_norm_std"], fmt="o", ms=3, color="C1", alpha=0.8,
                        label=f"Veit's estimate: one sampled path ({int(s['samples'].iloc[0])} per k)")
        ax.set_yscale("log")
        ax.set(xlabel="path length k", ylabel="gradient norm at the input", title=f"Gradient per path {label}")
        ax.legend(fontsize=7)
    return fig


def contribution_by_length(exact: pd.DataFrame, sampled: Optional[pd.DataFrame] = None, label: str = "",
                           mass: float = 0.9):
    """Total gradient by path length (Veit Fig. 6c) beside the exact ||g^(k)||; the effective range shaded."""
    t = _first_unit(exact)
    r = effective_range(exact, mass=mass)
    with _style() as plt:
        fig, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
        ax.plot(t["k"], t["norm"], "-", color="C0", label="exact ||g^(k)||")
        if sampled is not None and len(sampled):
            s = sampled.sort_values("k")
            ax.plot(s["k"], s["total"], "o--", ms=3, color="C1", label="Veit: path norm x C(n,k)")
        ax.axvspan(r["lo"] - 0.5, r["hi"] + 0.5, color="C0", alpha=0.12,
                   label=f"{int(mass * 100)}% of exact gradient: k = {r['lo']}-{r['hi']} (peak {r['peak']})")
        ax.set_yscale("log")
        ax.set(xlabel="path length k", ylabel="gradient norm at the input", title=f"Contribution by length {label}")
        ax.legend(fontsize=7)
    return fig


def spectrum_by_unit(exact: pd.DataFrame, label: str = ""):
    """log10 of ||g_l^(k)|| / ||dE/dx_l|| for every unit l (rows) and length k (columns)."""
    t = exact[exact["k"] >= 0]
    grid = t.pivot_table(index="unit", columns="k", values="share")
    with _style() as plt:
        fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
        im = ax.imshow(np.log10(grid.to_numpy(dtype=float)), aspect="auto", origin="lower", cmap="viridis",
                       vmin=-6, vmax=0)
        fig.colorbar(im, ax=ax, label="log10 ||g^(k)|| / ||dE/dx_l||")
        ax.set(xlabel="path length k", ylabel="unit l", title=f"Gradient by path length, every unit {label}")
    return fig


def contribution_over_training(paths: pd.DataFrame, label: str = "", mass: float = 0.9):
    """Exact ||g^(k)|| at the first unit by path length, one curve per probed iteration (paths.csv).

    The legend gives each probe's effective range (the shortest window of lengths holding ``mass``
    of sum_k ||g^(k)||) and whether the remainder beyond ``--probe-paths`` holds too much to tell.
    """
    import matplotlib.cm as cm
    its = sorted(paths["iteration"].unique())
    with _style() as plt:
        fig, ax = plt.subplots(figsize=(5.5, 3.4), layout="constrained")
        colours = cm.viridis(np.linspace(0, 0.9, len(its)))
        for it, c in zip(its, colours):
            t = paths[(paths["iteration"] == it) & (paths["backward"] == 0)] if "backward" in paths else \
                paths[paths["iteration"] == it]
            r = effective_range(t, mass=mass)
            first = _first_unit(t)
            tail = " (remainder too large: window unknown)" if r["truncated"] else ""
            ax.plot(first["k"], first["norm"], "o-", ms=2.5, color=c,
                    label=f"iteration {it}: {int(mass * 100)}% on k = {r['lo']}-{r['hi']}{tail}")
        ax.set_yscale("log")
        ax.set(xlabel="path length k", ylabel="||g^(k)|| at the first unit's input",
               title=f"Gradient by path length during training {label}".rstrip())
        ax.legend(fontsize=6)
    return fig


def lesion_curves(results: Sequence):
    """Three panels from :class:`gradflow.lesion.LesionResult` s: one unit removed, k removed, reordered."""
    with _style() as plt:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), layout="constrained")
        for i, r in enumerate(results):
            c = f"C{i}"
            if len(r.single):
                s = r.single
                axes[0].plot(s["unit"], s["error"], "o-", ms=3, color=c, label=r.network)
                down = s[s["downsampling"]]
                axes[0].plot(down["unit"], down["error"], "x", color="k", ms=6)
                axes[0].axhline(r.baseline, color=c, ls=":", lw=1)
            if len(r.random):
                g = r.random.groupby("k")["error"]
                axes[1].errorbar(g.mean().index, g.mean(), yerr=g.std().fillna(0), fmt="o-", ms=3, color=c,
                                 label=r.network)
            if len(r.reorder):
                axes[2].plot(r.reorder["kendall_tau"], r.reorder["error"], "o", ms=3, color=c, label=r.network)
        axes[0].set(xlabel="unit removed (x: changes shape)", ylabel="test error (%)",
                    title="One unit removed (dotted: intact)")
        axes[1].set(xlabel="units removed at random", ylabel="test error (%)", title="k units removed")
        axes[2].set(xlabel="Kendall tau of the unit order", ylabel="test error (%)", title="Units reordered")
        axes[2].invert_xaxis()
        for ax in axes:
            ax.legend(fontsize=7)
    return fig


def _first_unit(exact: pd.DataFrame) -> pd.DataFrame:
    t = exact[exact["unit"] == exact["unit"].min()]
    return t[t["k"] >= 0].sort_values("k")


# --- command line: compute and write figures/ ----------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gradflow.pathplots", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet110", help="a registered model, measured at init")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--samples", type=int, default=20, help="Veit's sampled paths per k (he used 1,000)")
    p.add_argument("--k-step", type=int, default=1, help="sample every k-step-th path length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="measure the paths of this trained run (on its test images, train-mode BN)")
    p.add_argument("--run", help="a run folder trained with --probe-every and --probe-paths: draw its "
                                 "paths.csv (the path-length split along training) and nothing else")
    p.add_argument("--lesion", help="a trained residual run folder: also draw the lesion curves")
    p.add_argument("--plain", help="a trained plain run folder (the contrast)")
    p.add_argument("--data", help="the CIFAR folder for the lesion study")
    p.add_argument("--test-images", type=int, default=0)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--out", default="figures")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    import platform
    import torch
    from . import create_model
    from .errors import GradflowError
    from .io import atomic_write
    from .paths import compare_table, path_components, sample_paths
    from .provenance import code_version, hardware
    matplotlib.use("Agg")
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    code = code_version()
    common = [f"command: python -m gradflow.pathplots {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
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
            from .runs import read_run
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
        torch.manual_seed(args.seed)
        if args.checkpoint:
            from .checkpoint import load_checkpoint
            from .lesion import cifar_test_batches
            if not args.data:
                raise GradflowError("--checkpoint needs --data (the CIFAR folder of the run's test set)")
            model, info = load_checkpoint(args.checkpoint)
            model.train()
            ns = argparse.Namespace(synthetic=False, data=args.data, no_verify=True, test_images=args.batch,
                                    batch_size=args.batch)
            x, y = cifar_test_batches(info, ns, torch.device("cpu"))[0][0]
            name = Path(args.checkpoint).resolve().name
            made = (f"the trained run {args.checkpoint} ({info.get('model')} {info.get('options')}, "
                    f"{info.get('step')} iterations), its first {args.batch} test images, train mode "
                    "(BN batch statistics), mean cross-entropy")
        else:
            model = create_model(args.model)
            g = torch.Generator().manual_seed(args.seed)
            x = torch.randn(args.batch, 3, 32, 32, generator=g)
            y = torch.randint(0, 10, (args.batch,), generator=g)
            name = args.model
            made = (f"made at initialisation (He init, seed {args.seed}), batch {args.batch} of N(0,1) images "
                    f"[{args.batch}, 3, 32, 32], uniform labels, train mode (BN batch statistics), mean "
                    f"cross-entropy; create_model({args.model!r})")
        exact = path_components(model, x, y=y).table
        n = int(exact["n_units"].max())
        sampled = sample_paths(model, x, y=y, ks=range(0, n + 1, args.k_step), samples=args.samples, seed=args.seed)
        r = effective_range(exact)
        rv = effective_range(sampled.assign(unit=0, n_units=n), column="total")
        setup = f"{made}; n = {n} units; gradients at the first unit's input"
        numbers = (f"exact: 90% of sum_k ||g^(k)|| on k = {r['lo']}-{r['hi']} (peak {r['peak']}, "
                   f"{100 * r['path_share']:.3g}% of all paths); Veit's estimate: k = {rv['lo']}-{rv['hi']} "
                   f"(peak {rv['peak']}, {100 * rv['path_share']:.3g}% of paths)")
        tag = f"paths_{name}"
        save(path_length_distribution({name: n}), f"{tag}_length_distribution",
             [f"share of the 2^{n} paths through k residual branches, C(n,k)/2^n (Veit Fig. 6a)."])
        save(gradient_per_length(exact, sampled, name), f"{tag}_gradient_per_path",
             ["gradient norm of one path by length k (Veit Fig. 6b): his sampling estimate "
              f"({args.samples} sampled paths per k: k random units pass the gradient through their branch "
              "only, the others through their shortcut only) beside the exact ||g^(k)|| / C(n,k).", setup])
        save(contribution_by_length(exact, sampled, name), f"{tag}_contribution",
             ["gradient by path length (Veit Fig. 6c): sampled path norm x C(n,k) beside the exact ||g^(k)||, "
              "which includes the cancellation between paths.", numbers, setup])
        save(spectrum_by_unit(exact, name), f"{tag}_spectrum",
             ["exact ||g_l^(k)|| / ||dE/dx_l|| for every unit l and path length k.", setup])
        atomic_write(out / f"{tag}.csv", lambda f: f.write(compare_table(exact, sampled).to_csv(index=False).encode()))
        if args.lesion:
            from .checkpoint import load_checkpoint
            from .lesion import cifar_test_batches, lesion_study, plain_blocks
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
            save(lesion_curves(results), "lesion_curves",
                 ["test error with one unit's branch removed, k random units removed "
                  f"({args.draws} draws per k) and same-stage units swapped (Veit Fig. 3, 5a, 5b).",
                  f"data: {described}", *runs,
                  *[f"{r.network}: intact {r.baseline:.2f}%; " + "; ".join(r.notes) for r in results]])
            atomic_write(out / "lesion_curves.csv", lambda f: f.write(
                pd.concat([r.table() for r in results]).to_csv(index=False).encode()))
    except GradflowError as e:
        print(f"gradflow.pathplots: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
