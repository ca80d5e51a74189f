"""The lesion study of Veit, Wilber and Belongie 2016, on any trained network.

At test time, with the weights untouched:

* **single**: each unit's residual branch removed in turn; the unit then passes
  only its shortcut path, through its combine coefficient and after-addition
  function: x_out = post(combine(h(x), 0, x)) (x itself for an identity unit);
* **random**: k units removed at once, several random draws per k (Veit's Fig. 5a);
* **reorder**: random swaps of two units of the same stage whose input and output
  shapes agree, reported against Kendall's tau between the original and the new
  order (Fig. 5b).

For a plain network (no shortcut) a block is removed by replacing it with the
identity, where its input and output shapes agree (Veit deletes VGG layers);
blocks that change the shape cannot be removed and are reported as such.

Library: :func:`lesion_study` (and the pieces it calls); CLI:
``python -m gradflow.lesion --checkpoint RUN --data DIR`` (see :func:`main`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch import Tensor

from .errors import GradflowError
from .parts import Parts, patched_forwards

Batches = Sequence[tuple[Tensor, Tensor]]


@dataclass
class Lesionable:
    """One block a lesion can remove: its module, name, stage, and parts (None: a plain block)."""

    name: str
    module: nn.Module
    stage: int
    parts: Optional[object] = None     # what UnitInfo.parts() returns: Parts or a Block
    x_shape: tuple = ()
    out_shape: tuple = ()

    @property
    def shape_preserving(self) -> bool:
        return self.x_shape == self.out_shape

    @property
    def removable(self) -> bool:
        return self.parts is not None or self.shape_preserving


def residual_blocks(model: nn.Module, units=None, parts=None) -> list[Lesionable]:
    """The model's residual units (as :func:`gradflow.find_units` finds them), grouped by module."""
    from .tracing.discover import find_units
    out: dict = {}
    for info in find_units(model, units, parts):
        if id(info.module) not in out:
            out[id(info.module)] = Lesionable(getattr(info, "module_name", "") or info.name, info.module,
                                              int(info.stage or 0),
                                              info.parts() if info.parts is not None else None)
    return list(out.values())


def plain_blocks(model: nn.Module) -> list[Lesionable]:
    """The blocks of a plain network (``model.blocks()``, as gradflow's plain20 ... plain110)."""
    blocks = getattr(model, "blocks", None)
    if not callable(blocks):
        raise GradflowError(f"{type(model).__name__} has no blocks() method: pass the plain network's "
                            "blocks as a list (lesion_study(model, ..., blocks=[...]))")
    return [Lesionable(f"block{i}", b, int(getattr(b, "block_stage", 0))) for i, b in enumerate(blocks())]


def _shapes(model: nn.Module, blocks: list[Lesionable], x: Tensor) -> None:
    """Fill each block's input and output shapes from one forward."""
    hooks = []
    for b in blocks:
        def hook(m, args, out, _b=b):
            _b.x_shape, _b.out_shape = tuple(args[0].shape[1:]), tuple(out.shape[1:])
        hooks.append(b.module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()


class _ShortcutOnly:
    """The runner for a lesioned block: every unit passes only its shortcut path."""

    def unit(self, k: int, parts: Parts, x: Tensor, *args, **kwargs) -> Tensor:
        z = parts.preact(x) if parts.preact is not None else x
        s_in = z if parts.shortcut_preact else x
        h = parts.shortcut(s_in) if parts.shortcut is not None else s_in
        y, _ = parts.combine(h, torch.zeros_like(h), x)
        return parts.post(y) if parts.post is not None else y

    def add(self, k: int, x: Tensor, h: Tensor, r: Tensor) -> Tensor:
        return h


def _lesioned_forward(block: Lesionable):
    if block.parts is None:
        if not block.shape_preserving:
            raise GradflowError(f"block {block.name!r} changes the shape {block.x_shape} -> {block.out_shape} "
                                "and has no shortcut: it cannot be removed")
        return lambda self_module, x, *a, **kw: x
    p = block.parts
    if isinstance(p, Parts):
        return lambda self_module, x, *a, **kw: _ShortcutOnly().unit(0, p, x)
    return lambda self_module, *a, **kw: p.forward(_ShortcutOnly(), *a, **kw)


_patched = patched_forwards


@contextmanager
def removed(blocks: Sequence[Lesionable], which: Iterable[int]):
    """Within the block, the blocks at indices ``which`` have their branches removed."""
    with _patched([(blocks[i].module, _lesioned_forward(blocks[i])) for i in which]):
        yield


@contextmanager
def reordered(blocks: Sequence[Lesionable], order: Sequence[int]):
    """Within the block, position i runs block ``order[i]`` (shape-compatible swaps only)."""
    originals = [b.module.forward for b in blocks]
    with _patched([(blocks[i].module, originals[j]) for i, j in enumerate(order) if i != j]):
        yield


def error_rate(model: nn.Module, batches: Batches) -> float:
    """Top-1 error in percent over ``batches`` of (images, labels), in eval mode without gradients."""
    wrong = total = 0
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in batches:
                wrong += (model(x).argmax(1) != y).sum().item()
                total += len(y)
    finally:
        model.train(was)
    return 100.0 * wrong / max(total, 1)


def swap_pairs(blocks: Sequence[Lesionable]) -> list[tuple[int, int]]:
    """Pairs of blocks that may trade places: same stage, same shape, shape-preserving."""
    groups: dict = {}
    for i, b in enumerate(blocks):
        if b.shape_preserving:
            groups.setdefault((b.stage, b.x_shape), []).append(i)
    return [(a, c) for g in groups.values() for ai, a in enumerate(g) for c in g[ai + 1:]]


def kendall_tau(order: Sequence[int]) -> float:
    """Kendall's tau between 0..n-1 and ``order`` (1: unchanged, -1: reversed)."""
    from scipy.stats import kendalltau
    n = len(order)
    return 1.0 if list(order) == list(range(n)) else float(kendalltau(np.arange(n), np.asarray(order))[0])


@dataclass
class LesionResult:
    """Tidy tables of one network's lesion study; ``baseline`` is the intact test error (%)."""

    network: str
    baseline: float
    single: pd.DataFrame
    random: pd.DataFrame
    reorder: pd.DataFrame
    notes: list = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        """All rows in one table with a ``study`` column (single, random, reorder)."""
        parts = [self.single.assign(study="single"), self.random.assign(study="random"),
                 self.reorder.assign(study="reorder")]
        return pd.concat([p for p in parts if len(p)], ignore_index=True).assign(
            network=self.network, baseline=self.baseline)


def lesion_study(model: nn.Module, batches: Batches, blocks: Optional[list[Lesionable]] = None,
                 ks: Sequence[int] = (1, 2, 5, 10, 20), draws: int = 5, swaps: Sequence[int] = (1, 2, 5, 10, 20),
                 seed: int = 0, network: str = "", single: bool = True) -> LesionResult:
    """Test error of ``model`` with branches removed and units reordered (Veit et al. 2016, Fig. 3, 5).

    Args:
        model: a trained network (put on the batches' device).
        batches: (images, labels) test batches.
        blocks: what may be removed (default: :func:`residual_blocks`, else a plain net's blocks).
        ks: how many blocks to remove at once; ``draws`` random sets each (k larger than the
            number of removable blocks is skipped, with a note).
        swaps: how many random swaps of compatible blocks; ``draws`` orders each.
        seed: the draws' generator.
    Returns:
        A :class:`LesionResult`.
    """
    batches = list(batches)
    if not batches:
        raise GradflowError("no test batches: pass (images, labels) pairs")
    if blocks is None:
        try:
            blocks = residual_blocks(model)
        except GradflowError:
            blocks = plain_blocks(model)
    _shapes(model, blocks, batches[0][0][:2])
    notes = []
    if any(b.parts is None for b in blocks) and any(b.parts is not None for b in blocks):
        notes.append("units without parts are removed by replacing them with the identity")
    base = error_rate(model, batches)
    rng = np.random.default_rng(seed)
    single_rows = []
    if single:
        for i, b in enumerate(blocks):
            row = dict(unit=i, name=b.name, stage=b.stage, downsampling=not b.shape_preserving,
                       removable=b.removable)
            if b.removable:
                with removed(blocks, [i]):
                    row["error"] = error_rate(model, batches)
            else:
                row["error"] = float("nan")
            single_rows.append(row)
        if any(not b.removable for b in blocks):
            notes.append("blocks that change the shape without a shortcut cannot be removed: error NaN")
    removable = [i for i, b in enumerate(blocks) if b.removable]
    random_rows = []
    for k in ks:
        if k > len(removable):
            notes.append(f"k={k} skipped: only {len(removable)} blocks can be removed")
            continue
        for d in range(draws):
            which = sorted(rng.choice(removable, size=k, replace=False).tolist())
            with removed(blocks, which):
                random_rows.append(dict(k=k, draw=d, removed=" ".join(map(str, which)),
                                        error=error_rate(model, batches)))
    pairs = swap_pairs(blocks)
    reorder_rows = []
    if swaps and not pairs:
        notes.append("no two blocks share a stage and shape: reordering skipped")
    for s in (swaps if pairs else ()):
        for d in range(draws):
            order = list(range(len(blocks)))
            for _ in range(s):
                a, c = pairs[rng.integers(len(pairs))]
                order[a], order[c] = order[c], order[a]
            with reordered(blocks, order):
                reorder_rows.append(dict(swaps=s, draw=d, kendall_tau=kendall_tau(order),
                                         error=error_rate(model, batches)))
    return LesionResult(network or type(model).__name__, base, pd.DataFrame(single_rows),
                        pd.DataFrame(random_rows), pd.DataFrame(reorder_rows), notes)


# --- command line ----------------------------------------------------------------------------

def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GradflowError(f"{what} {text!r}: give comma-separated integers, e.g. 1,2,5,10") from None
    if any(v < 0 for v in vals):
        raise GradflowError(f"{what} {text!r}: the numbers must be >= 0")
    return vals


def get_args_parser():
    import argparse
    p = argparse.ArgumentParser(prog="python -m gradflow.lesion",
                                description="Veit et al.'s lesion study on a trained checkpoint: test error "
                                            "with units' branches removed and units reordered.")
    p.add_argument("--checkpoint", required=True, help="a gradflow run folder or its checkpoint.pt")
    p.add_argument("--data", help="CIFAR folder (the release tarball or its extracted folder)")
    p.add_argument("--synthetic", action="store_true", help="the generated data of train --synthetic runs")
    p.add_argument("--no-verify", action="store_true", help="skip the md5 check (re-packed data)")
    p.add_argument("--plain", help="a trained plain network's run folder (e.g. --model plain110), the contrast")
    p.add_argument("--test-images", type=int, default=0, help="first N test images (0: all)")
    p.add_argument("--ks", default="1,2,5,10,20", help="how many units to remove at once")
    p.add_argument("--swaps", default="1,2,5,10,20", help="how many random swaps of same-stage units")
    p.add_argument("--draws", type=int, default=5, help="random draws per k and per swap count")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output folder (default runs/lesion/<run name>)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def cifar_test_batches(info: dict, args, device) -> tuple[list, str]:
    """The checkpoint's CIFAR test set, normalised as the trainer does (the training images' channel stats).

    Args:
        info: what :func:`gradflow.load_checkpoint` returns beside the model (its ``config``).
        args: ``synthetic``, ``data``, ``no_verify``, ``test_images`` (0: all), ``batch_size``.
        device: where the batches go.
    Returns:
        ([(images, labels), ...], a description of the data).
    """
    from .data import SYNTHETIC, DeviceCifar, load_cifar, synthetic_arrays
    cfg = info.get("config") or {}
    dataset = cfg.get("dataset", "cifar10")
    if args.synthetic:
        arrays, where = synthetic_arrays(dataset=dataset, seed=cfg.get("seed", 0), **SYNTHETIC), "generated data"
    else:
        if not args.data:
            raise GradflowError("--data is required: the CIFAR folder the checkpoint's test set comes from "
                                "(or --synthetic for a run trained on generated data)")
        arrays, where = load_cifar(dataset, args.data, verify=not args.no_verify), args.data
    data = DeviceCifar(arrays, device, test_subset=args.test_images)
    return list(data.test_batches(args.batch_size)), f"{dataset} test set from {where} ({len(data.test_y)} images)"


def run_cli(args) -> dict:
    """Everything :func:`main` does, returning the summary (raises GradflowError on bad input)."""
    import json
    from pathlib import Path
    from .checkpoint import load_checkpoint
    from .cli import resolve_device
    from .io import atomic_write
    if args.draws < 1 or args.batch_size < 1 or args.test_images < 0:
        raise GradflowError(f"--draws {args.draws}, --batch-size {args.batch_size}, --test-images "
                            f"{args.test_images}: draws and batch size must be >= 1, test images >= 0")
    ks, swaps = _ints(args.ks, "--ks"), _ints(args.swaps, "--swaps")
    device = resolve_device(args.device)
    model, info = load_checkpoint(args.checkpoint, map_location=device)
    batches, described = cifar_test_batches(info, args, device)
    results = [lesion_study(model, batches, ks=ks, draws=args.draws, swaps=swaps, seed=args.seed,
                            network=info.get("model", "model"))]
    if args.plain:
        plain, pinfo = load_checkpoint(args.plain, map_location=device)
        results.append(lesion_study(plain, batches, blocks=plain_blocks(plain), ks=ks, draws=args.draws,
                                    swaps=swaps, seed=args.seed, network=pinfo.get("model", "plain")))
    table = pd.concat([r.table() for r in results], ignore_index=True)
    out = Path(args.out or Path("runs") / "lesion" / Path(args.checkpoint).resolve().name)
    out.mkdir(parents=True, exist_ok=True)
    summary = dict(checkpoint=str(args.checkpoint), plain=args.plain, data=described, seed=args.seed,
                   draws=args.draws, networks=[_summary(r) for r in results])
    atomic_write(out / "lesion.csv", lambda f: f.write(table.to_csv(index=False).encode()))
    atomic_write(out / "summary.json", lambda f: f.write(json.dumps(summary, indent=2, default=float).encode()))
    try:
        from .plot import lesion_curves
        fig = lesion_curves(results)
        atomic_write(out / "lesion.png", lambda f: fig.savefig(f, format="png", dpi=120))
    except ImportError:
        pass
    summary["out"] = str(out)
    return summary


def _summary(r: LesionResult) -> dict:
    single = r.single.dropna(subset=["error"]) if len(r.single) else r.single
    d = dict(network=r.network, baseline_error=r.baseline, notes=r.notes)
    if len(single):
        d["single_removal_error"] = dict(mean=float(single["error"].mean()), max=float(single["error"].max()),
                                         worst_unit=str(single.loc[single["error"].idxmax(), "name"]))
    if len(r.random):
        d["k_removed_error"] = {int(k): float(g["error"].mean()) for k, g in r.random.groupby("k")}
    if len(r.reorder):
        d["reorder_error"] = {int(s): dict(kendall_tau=float(g["kendall_tau"].mean()), error=float(g["error"].mean()))
                              for s, g in r.reorder.groupby("swaps")}
    return d


def format_summary(summary: dict) -> str:
    lines = [f"lesion study of {summary['checkpoint']} on {summary['data']}"]
    for n in summary["networks"]:
        lines.append(f"  {n['network']}: intact test error {n['baseline_error']:.2f}%")
        if "single_removal_error" in n:
            s = n["single_removal_error"]
            lines.append(f"    one unit removed: mean {s['mean']:.2f}%, worst {s['max']:.2f}% ({s['worst_unit']})")
        for k, e in n.get("k_removed_error", {}).items():
            lines.append(f"    {k} units removed: {e:.2f}%")
        for s, v in n.get("reorder_error", {}).items():
            lines.append(f"    {s} swaps (Kendall tau {v['kendall_tau']:.2f}): {v['error']:.2f}%")
        lines += [f"    note: {t}" for t in n["notes"]]
    lines.append(f"files in {summary['out']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m gradflow.lesion``: 0 on success, 2 on bad input (one line naming the value and the fix)."""
    import json
    import sys
    args = get_args_parser().parse_args(argv)
    try:
        summary = run_cli(args)
    except GradflowError as e:
        print(f"gradflow.lesion: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=float) if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
