"""Tracing under a process group (DDP, FSDP2): one table for the global batch.

Under ``torch.distributed`` with two or more processes, each rank's tracer records its
own slice of the batch as usual. When a step's rows are written, every rank puts all its
micro-batches' reductions (the per-sample columns and the one-number ones, already one
flat float32 tensor per micro-batch: :func:`~gradflow.tracing.tables.pack`) into one
buffer, and **one** ``all_gather`` per recorded step, whatever the depth and the number of
micro-batches, gives every rank every rank's. The step's tables are then the global batch's:

* per-sample columns joined in rank order: ``sample`` counts over the global batch, as a
  single process given ``torch.cat`` of the ranks' batches would, and ``rank`` says whose
  sample it was; ``tr.units``' means, spreads and quantiles are over the global batch;
* one-number columns joined as their quantity says: names in ``Quantity.summed`` are
  partial norms over the parameters each rank holds (a replicated parameter, as under DDP,
  is counted by rank 0 only; an FSDP2 ``DTensor`` shard by the rank that holds it), joined
  as the root of their sum of squares; the others are rank 0's.

Every rank keeps the joined tables (``history=``; built only when read, so a rank that
never reads them pays for the collective only) and sinks write on rank 0, or, for a sink
made with ``per_rank=True``, on every rank into its own file, with that rank's samples.

The buffers must be the same length on every rank, so each carries a header (the step, its
block count, its layout, the length it needs) and is padded to a capacity the ranks agreed:
the first recorded step, and a step whose need grows past every earlier one (a larger
batch), take a second collective to agree on it; every other step takes one. The buffer is
float64 where the reductions are (a float64 model), else float32. Every rank
must record the same steps in the same order (the same forwards and backwards, as data
parallel training does): a step whose layout differs between ranks is refused, with both.
"""
from __future__ import annotations

import sys
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from gradflow.errors import GradflowError

HEADER = 6          # step, blocks, cells per sample, one-number cells, length needed (two digits)
_STEP_MOD = 2 ** 24  # float32 holds integers exactly up to here
_DIGIT = 2 ** 16     # the length in base 2**16: exact in float32 up to 2**40 floats
# Floats per rank the ranks agreed on: raised only from gathered headers, so the same on every
# rank; kept across tracers (the trainer makes one per probe), so only a larger need costs a round.
_CAPACITY = HEADER


def _gather(out: torch.Tensor, inp: torch.Tensor) -> None:
    """The one collective: every rank's ``inp`` into ``out`` ([world * len]), in rank order."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp)


def world() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def active() -> bool:
    """Whether a process group of 2+ ranks is initialised."""
    return dist.is_available() and dist.is_initialized() \
        and dist.get_world_size() > 1


def local(t: torch.Tensor) -> torch.Tensor:
    """A ``DTensor``'s part on this rank; any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "placements") else t


_PARTIAL_WARNED: list = []


def share(t: torch.Tensor, owner: torch.Tensor) -> list:
    """What this rank adds to a norm over ``t`` ([] or [tensor]), placed as ``owner`` is.

    A plain tensor under a process group is a replica (DDP keeps every parameter and its
    averaged gradient identical on every rank): counted on rank 0 only. A ``DTensor``
    counts its local part on the ranks at coordinate 0 of each mesh dimension it is
    replicated over; one holding partial sums cannot be normed by parts (NaN, said once).
    """
    placements = getattr(owner, "placements", None)
    if placements is None:
        return [t] if dist.get_rank() == 0 else []
    coord = owner.device_mesh.get_coordinate()
    if coord is None:
        return []
    for i, pl in enumerate(placements):
        if pl.is_partial():
            if not _PARTIAL_WARNED:
                _PARTIAL_WARNED.append(True)
                import warnings
                warnings.warn("gradflow.trace: a DTensor holds partial sums (Partial placement): its norm "
                              "cannot be joined from its parts, so its unit's weight columns are NaN",
                              RuntimeWarning, stacklevel=3)
            return [torch.full((), float("nan"), device=local(t).device)]
        if pl.is_replicate() and coord[i] != 0:
            return []
    return [local(t)]


def is_sharded(t) -> bool:
    """Whether ``t`` is a ``DTensor`` split over ranks (FSDP2's ``fully_shard`` parameters)."""
    return any(pl.is_shard() for pl in getattr(t, "placements", ()))


def ranks_for(tracer) -> Optional["Ranks"]:
    """The tracer's :class:`Ranks` under a process group of 2+ (None: one process, or ``gather=False``).

    What cannot be recorded across ranks is refused here, by name, before the run.
    """
    if not tracer.gather or world() < 2:
        return None
    if tracer._ranks is not None:
        return tracer._ranks            # re-attached: the same collaborator
    sharded = next((n for n, p in tracer.model.named_parameters() if is_sharded(p)), None)
    flat = next((n for n, p in tracer.model.named_parameters() if type(p).__name__ == "FlatParameter"), None)
    if flat is not None:
        raise GradflowError(f"parameter {flat!r} is an FSDP1 FlatParameter (FullyShardedDataParallel): its "
                            "units' parameters are flattened into it, so their weight norms cannot be read. "
                            "Shard with FSDP2 instead (torch.distributed.fsdp.fully_shard on each unit, then "
                            "the model), or with FullyShardedDataParallel(..., use_orig_params=True)")
    if tracer._paths is not None:
        raise GradflowError(
            f"trace(..., paths=...) under a process group of {world()} ranks: the path-length split is "
            "not joined across ranks" + (f", and its vector-Jacobian products cannot run through sharded "
                                         f"parameters ({sharded!r} is a DTensor shard)" if sharded else "")
            + ". Drop paths=, or split one rank's own samples with trace(..., paths=..., gather=False)")
    from gradflow.tracing.quantities import Spectra
    if sharded and any(isinstance(q, Spectra) for q in tracer.quantities):
        raise GradflowError(f"the Spectra quantity (sigma_unit, ...) under FSDP: it runs each unit's parts "
                            f"itself, outside the all-gather of its sharded parameters ({sharded!r}). "
                            "Drop the Spectra quantity (the 'full' preset), or trace an unsharded copy")
    if tracer.keep:
        tracer._warn("keep_local", f"keep={list(tracer.keep)} under a process group: tr.tensors holds this "
                     "rank's own samples (they are not gathered)")
    return Ranks({n for q in tracer.quantities for n in q.summed})


class Ranks:
    """A tracer's collaborator under a process group: joins each written step's rows."""

    def __init__(self, summed: set):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.summed = summed        # one-number names joined as partial norms
        self.collectives = 0        # calls of the collective (the tests and benchmarks read it)
        backend = str(dist.get_backend()).lower()
        self._cuda = "nccl" in backend

    def describe(self) -> str:
        return (f"gradflow: tracing under a process group of {self.world} ranks: each recorded step's rows "
                f"are gathered (one collective per step), so the tables hold the global batch, with a "
                f"`rank` column; sinks write on rank 0 (per_rank=True: one file per rank)")

    def say(self, who: str = "gradflow") -> None:
        """One line on rank 0 (stderr): what a distributed trace records."""
        if self.rank == 0:
            print(self.describe().replace("gradflow", who, 1), file=sys.stderr, flush=True)


    # -- the step's collective ------------------------------------------------------------------

    def join(self, step: int, packs: list) -> list:
        """Every rank's packed micro-batches of this step (one collective): one :class:`Joined` each."""
        blocks, cells, scells = [], 0, 0
        dev = None
        for p in packs:
            if p.host is not None:
                dev = p.host.device
        dev = dev if dev is not None and (dev.type == "cuda") == self._cuda else \
            torch.device("cuda", torch.cuda.current_device()) if self._cuda else torch.device("cpu")
        for p in packs:
            blocks.append(torch.tensor([float(p.B)], dtype=torch.float32, device=dev))
            if p.host is not None:
                blocks.append(p.host.to(dev))
            cells += sum(len(idx) for _, idx in p.cols)
            scells += sum(len(idx) for _, idx in p.scols)
        need = HEADER + sum(b.numel() for b in blocks)
        head = torch.tensor([float(step % _STEP_MOD), float(len(packs)), float(cells), float(scells),
                             float(need // _DIGIT), float(need % _DIGIT)], dtype=torch.float32, device=dev)
        mine = torch.cat([head] + blocks)
        global _CAPACITY
        got = self._all_gather(mine, _CAPACITY)
        needs = got[:, 4].double() * _DIGIT + got[:, 5].double()
        if (needs > got.shape[1]).any():   # someone's buffer did not fit: agree on a larger capacity
            _CAPACITY = int(needs.max())
            got = self._all_gather(mine, _CAPACITY)
        heads = got[:, :4]
        if not (heads == heads[:1]).all():
            rows = "; ".join(f"rank {r}: step {int(h[0])}, {int(h[1])} micro-batches, {int(h[2])} "
                             f"per-sample and {int(h[3])} one-number cells" for r, h in enumerate(heads.tolist()))
            raise GradflowError("gradflow.trace under a process group: the ranks wrote different steps "
                                f"({rows}). Every rank must record the same steps (the same forwards and "
                                "backwards, as data-parallel training does); trace one rank only with "
                                "gather=False")
        # each rank's blocks start where its previous one ended (batch sizes may differ)
        host = got.numpy().astype(np.float64)
        offs, out = [HEADER] * self.world, []
        for p in packs:
            per_sample = sum(len(idx) for _, idx in p.cols)
            one = sum(len(idx) for _, idx in p.scols)
            spans = []
            for r in range(self.world):
                B = int(host[r, offs[r]])
                spans.append((offs[r] + 1, B))
                offs[r] += 1 + per_sample * B + one
            out.append(Joined(host, spans, p, self.summed))
        return out

    def _all_gather(self, mine: torch.Tensor, length: int) -> torch.Tensor:
        # float64 stays float64 (a closed-form check's precision); every rank traces the same model,
        # so the dtype, like the layout, is the same on every rank
        dtype = torch.float64 if mine.dtype == torch.float64 else torch.float32
        buf = torch.zeros(length, dtype=dtype, device=mine.device)
        n = min(length, mine.numel())
        buf[:n] = mine[:n]
        out = torch.empty(self.world * length, dtype=dtype, device=mine.device)
        _gather(out, buf)
        self.collectives += 1
        return out.view(self.world, length).cpu()


class Joined:
    """One micro-batch of the global batch: every rank's reductions, unpacked when first read.

    ``only``: the rank whose samples to keep (a per-rank sink's table); the one-number
    columns are joined over every rank either way.
    """

    __slots__ = ("host", "spans", "cols", "scols", "n", "summed", "only")

    def __init__(self, host: np.ndarray, spans: list, p, summed: set, only: Optional[int] = None):
        self.host, self.spans, self.summed, self.only = host, spans, summed, only
        self.cols, self.scols, self.n = p.cols, p.scols, p.n

    def local(self, rank: int) -> "Joined":
        j = Joined.__new__(Joined)
        for a in Joined.__slots__:
            setattr(j, a, getattr(self, a))
        j.only = rank
        return j

    def _ranks(self) -> list:
        return list(range(len(self.spans))) if self.only is None else [self.only]

    def sample_ranks(self) -> np.ndarray:
        """The rank of each of the joined samples ([B])."""
        ranks = self._ranks()
        return np.repeat(np.array(ranks), [self.spans[r][1] for r in ranks])

    def unpack(self) -> tuple[dict, dict, int]:
        """As :func:`~gradflow.tracing.tables.unpack`, over the ranks' samples side by side."""
        ranks, n = self._ranks(), self.n
        Bs = [self.spans[r][1] for r in ranks]
        total = sum(Bs)
        raw = {k: np.full((n, total), np.nan) for k, _ in self.cols}
        col = 0
        for r, B in zip(ranks, Bs):
            o = self.spans[r][0]
            for k, idx in self.cols:
                raw[k][idx, col:col + B] = self.host[r, o:o + len(idx) * B].reshape(len(idx), B)
                o += len(idx) * B
            col += B
        sc: dict = {}
        ends = [self.spans[r][0] + sum(len(idx) for _, idx in self.cols) * self.spans[r][1]
                for r in range(len(self.spans))]
        for k, idx in self.scols:
            vals = np.stack([self.host[r, e:e + len(idx)] for r, e in enumerate(ends)])   # [world, cells]
            ends = [e + len(idx) for e in ends]
            a = sc[k] = np.full(n, np.nan)
            a[idx] = np.sqrt(np.sum(vals * vals, axis=0)) if k in self.summed else vals[0]
        return raw, sc, total


def say(tracer, who: str) -> None:
    """The one line an integration prints on rank 0 when its trace joins a process group's ranks."""
    if getattr(tracer, "_ranks", None) is not None:
        tracer._ranks.say(who)
