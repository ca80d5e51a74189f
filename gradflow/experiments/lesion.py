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
``python -m gradflow lesion --checkpoint RUN --data DIR`` (:mod:`gradflow.cli.lesion`).
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

from gradflow.errors import GradflowError
from gradflow.tracing.parts import Parts, Runner, patched_forwards

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
    from gradflow.tracing.discover import find_units
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


class _ShortcutOnly(Runner):
    """The runner for a lesioned block: every unit passes only its shortcut path."""

    def __init__(self, name: str = ""):
        self.name = name

    def unit_name(self, k: int) -> str:
        return f"{self.name}#{k}" if k else self.name

    def run_unit(self, k: int, parts: Parts, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        z = parts.preact(x) if parts.preact is not None else x
        shortcut_in = z if parts.shortcut_preact else x
        h = parts.shortcut(shortcut_in) if parts.shortcut is not None else shortcut_in
        y, _ = parts.combine(h, torch.zeros_like(h), x)
        return parts.post(y) if parts.post is not None else y

    def run_add(self, k: int, x: Tensor, h: Tensor, r: Tensor) -> Tensor:
        return h


def _lesioned_forward(block: Lesionable):
    if block.parts is None:
        if not block.shape_preserving:
            raise GradflowError(f"block {block.name!r} changes the shape {block.x_shape} -> {block.out_shape} "
                                "and has no shortcut: it cannot be removed")
        return lambda self_module, x, *a, **kw: x
    p = block.parts
    if isinstance(p, Parts):
        return lambda self_module, x, *a, **kw: _ShortcutOnly(block.name).unit(0, p, x)
    return lambda self_module, *a, **kw: p.forward(_ShortcutOnly(block.name), *a, **kw)


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


def correct(model: nn.Module, batches: Batches) -> np.ndarray:
    """Per test image, whether the top-1 prediction is right (eval mode, no gradients), in batch order."""
    out = []
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in batches:
                out.append((model(x).argmax(1) == y).cpu().numpy())
    finally:
        model.train(was)
    return np.concatenate(out) if out else np.zeros(0, bool)


def error_rate(model: nn.Module, batches: Batches) -> float:
    """Top-1 error in percent over ``batches`` of (images, labels), in eval mode without gradients."""
    right = correct(model, batches)
    return 100.0 * float((~right).sum()) / max(len(right), 1)


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
    intact_correct: Optional[np.ndarray] = None   # per test image: right with nothing removed
    single_correct: dict = field(default_factory=dict)   # unit -> per test image: right with it removed

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
    intact = correct(model, batches)
    base = 100.0 * float((~intact).sum()) / max(len(intact), 1)
    rng = np.random.default_rng(seed)
    single_rows, single_correct = [], {}
    if single:
        for i, b in enumerate(blocks):
            row = dict(unit=i, name=b.name, stage=b.stage, downsampling=not b.shape_preserving,
                       removable=b.removable)
            if b.removable:
                with removed(blocks, [i]):
                    right = single_correct[i] = correct(model, batches)
                row["error"] = 100.0 * float((~right).sum()) / max(len(right), 1)
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
                        pd.DataFrame(random_rows), pd.DataFrame(reorder_rows), notes, intact, single_correct)


def cifar_test_batches(info: dict, args, device) -> tuple[list, str]:
    """The checkpoint's CIFAR test set, normalised as the trainer does (the training images' channel stats).

    Args:
        info: what :func:`gradflow.load_checkpoint` returns beside the model (its ``config``).
        args: ``synthetic``, ``data``, ``no_verify``, ``test_images`` (0: all), ``batch_size``.
        device: where the batches go.
    Returns:
        ([(images, labels), ...], a description of the data).
    """
    from gradflow.data.cifar import SYNTHETIC, DeviceCifar, load_cifar, synthetic_arrays
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
