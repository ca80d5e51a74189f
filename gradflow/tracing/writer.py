"""From recorded micro-batches to the tables: one host transfer each, stored and streamed.

A micro-batch's rows are written once it is complete (or its step ends): one
row per unit per backward pass that reached it, plus the x_L row; quantities
derive their columns on the host; the rows go to memory (``history=``) and to
every sink. The DataFrames are built when first read (``tr.units``, a sink):
a training loop that only records pays for the host arrays, not for pandas.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from gradflow.tracing.discover import UnitInfo, renumber_stages
from gradflow.tracing.quantities import Derive
from gradflow.tracing.records import Micro
from gradflow.tracing.tables import SUMMARIES, Packed, pack, samples_table, units_table, unpack, unscale


class TableWriter:
    """Mixin of :class:`~gradflow.tracing.Tracer`: writing and reading its tables."""

    # -- tables -----------------------------------------------------------------------

    def _write(self, micros: list, final: bool) -> list:
        """Tabulate micro-batches (one host transfer each); when final, store and stream them."""
        frames = []
        for m in micros:
            if final:
                m.final = True
                if m.top_handle is not None:
                    m.top_handle.remove()
                    m.top_handle = None
                if m in self._clock.open:
                    self._clock.open.remove(m)
            if m.calls:
                frames.append(self._tables(m, final))
            if final:
                _release(m)
        if not (final and frames):
            return frames
        ranks = self._ranks
        if ranks is not None:   # every rank's rows of this step, in one collective
            for f, joined in zip(frames, ranks.join(frames[0].step, [f.packed for f in frames])):
                f.packed = joined
        step = _Frames(frames)
        if self.history is None or self.history > 0:
            self._frames.append(step)
            if self.history is not None:
                while len(self._frames) > self.history:
                    self._frames.popleft()
        local = _Frames([f.local(ranks.rank) for f in frames]) if ranks is not None and \
            any(getattr(s, "per_rank", False) for s in self.sinks) else None
        for s in self.sinks:
            if local is not None and getattr(s, "per_rank", False):   # this rank's own samples
                out = local
            elif ranks is not None and ranks.rank != 0:
                continue
            else:
                out = step
            s.write(out.units, out.samples if getattr(s, "uses_samples", True) else _NO_SAMPLES)
        return frames

    def _tables(self, m: Micro, final: bool) -> "_Frame":
        calls = m.calls
        if not self._stages_done:
            renumber_stages([c.info for c in calls], [c.out_shape for c in calls])
            self._stages_done = True
        for c in calls:
            if not c.info.x_shape:
                c.info.x_shape = c.x_shape
        self._top_forward(m)
        passes = sorted(m.done) or [None]
        if final and m.expects_grad:
            self._check_complete(m)
        metas, rows, scalars, scales = [], [], [], []
        none: dict = {}
        for p in passes:
            start = len(rows)
            w = m.weights.get(p, none) if self.optimizer is None else self._weights.step_stats if m.phase == "train" else none
            for c in calls:   # a row's dicts in order (later ones win a name, as a merged dict would)
                rows.append((c.fwd, c.bwd.get(p, none) if p is not None else none))
                scalars.append((c.scalars, w.get(id(c.info), none)))
                metas.append(self._meta(m, p, c.index, c.info, c.x_shape, c.info.scalar_coef))
            top = dict(m.top_fwd)
            if p is not None and p in m.top:
                g = m.top[p]
                top["grad_norm"] = g
                if self.split:
                    zero = torch.zeros_like(g)
                    top.update(direct_norm=g, ref_norm=g, direct_log_scale=zero, ref_log_scale=zero,
                               residual_norm=zero, dot_direct_residual=zero)
            rows.append((top,))
            scalars.append(())
            last = calls[-1]
            metas.append(self._meta(m, p, len(calls), last.info, last.out_shape, np.nan, top=True))
            if p is not None and p in m.scale:
                scales.append((slice(start, len(rows)), m.scale[p]))
        return _Frame(metas, pack(rows, scalars, host=not (final and self._ranks is not None)), scales,
                      (self.quantities, self.cancel_tol, self._scalar_cols, self._columns,
                       self.optimizer is None), m.step)

    def _meta(self, m: Micro, p, index: int, info: UnitInfo, shape: str, coef, top: bool = False) -> dict:
        d = dict(step=m.step, micro=m.micro, phase=m.phase, backward=p if p is not None else 0,
                 unit=index, name="head_input" if top else info.name, stage=info.stage,
                 kind="x_L" if top else info.kind, is_top=top,
                 scalar_coef=coef, x_shape=shape)
        if self.optimizer is not None:
            d["skipped"] = m.skipped
        return d

    def _check_complete(self, m: Micro) -> None:
        if not m.done:
            raised = getattr(self, "_raised", None)
            self._warn("nobackward", f"step {m.step} (micro {m.micro}): " + (
                f"the traced code raised {raised} before a backward pass reached its units" if raised else
                "no backward pass reached its units before its rows were written")
                + "; their gradient columns are NaN")
            return
        want = [c for c in m.calls if c.expects_grad]
        for p in m.done:
            missed = [c for c in want if p not in c.bwd]
            if missed:
                names = _names(missed)
                self._warn(f"partial:{names}", f"step {m.step} (micro {m.micro}): backward pass {p} did not "
                           f"reach unit(s) {names}: the loss does not depend on their output (or only "
                           "through a detached tensor), so their gradient columns are NaN")
        off = [c for c in m.calls if not c.expects_grad]
        if off and m.phase == "train":
            names = _names(off)
            self._warn(f"nograd:{names}", f"step {m.step} (micro {m.micro}): unit(s) {names} ran without "
                       "autograd (their input and output do not both require grad, or they ran under "
                       "no_grad), so their gradient columns are NaN")

    def _all(self, which: int) -> pd.DataFrame:
        frames = [f[which] for f in self._frames]
        if self.optimizer is None:   # complete micro-batches not written yet: shown, not closed
            ready = [m for m in self._clock.open if m.complete and m.calls]
            if ready and self._ranks is not None:   # joining them is a collective every rank must call
                self._warn("unjoined", "under a process group a step's rows are shown once written (at the "
                           "next forward of the model, or when the trace detaches): joining the ranks' rows "
                           "is a collective every rank takes part in, so reading the tables cannot do it")
                ready = []
            frames += [f[which] for f in self._write(ready, final=False)]
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if len(df):  # forwards without a backward (no_grad, eval): gradient columns NaN, not absent
            want = self.columns(samples=which == 1)
            grad = {c for q in self.quantities if q.needs in ("grad", "split", "weights")
                    for c in (*q.columns, *q.scalars)}
            missing = [c for c in want if c not in df and (c in grad or c.rsplit("_", 1)[0] in grad
                                                          or c == "cancel_frac" and "cancel" in grad)]
            if missing:
                df = pd.concat([df, pd.DataFrame(np.nan, index=df.index, columns=missing)], axis=1)
                order = [c for c in want if c in df]
                df = df[order + [c for c in df.columns if c not in order]]
        return df

    def columns(self, samples: bool = False) -> list:
        """Every column ``tr.units`` (or ``tr.samples``) can hold with these quantities, in order."""
        per = list(self._columns)
        if samples:
            return ["step", "micro", "phase", "backward", "unit", "sample"] + \
                (["rank"] if self._ranks is not None else []) + per
        cols = ["step", "micro", "phase", "backward", "unit", "name", "stage", "kind", "is_top",
                "scalar_coef", "x_shape"] + (["skipped"] if self.optimizer is not None else [])
        cols += [c for q in self.quantities if q.needs != "update" or self.optimizer is not None
                 for c in q.scalars]
        cols += ["batch"] + (["x_var"] if "x_rms" in per else [])
        for c in per:
            cols += ["cancel_frac"] if c == "cancel" else [c] + [f"{c}_{s}" for s in SUMMARIES]
        return cols

    @property
    def units(self) -> pd.DataFrame:
        """One row per unit per micro-batch per backward pass per recorded step, plus x_L's.

        Columns: identification (step, micro, phase, backward, unit, name,
        stage, kind, is_top, x_shape), then each per-sample quantity's batch
        mean under its own name with ``_std``, ``_q05``, ``_q50`` and ``_q95``
        beside it, ``x_var`` (variance over the batch's elements),
        ``cancel_frac`` (share of samples where the residual term cancels the
        direct one) and the one-number quantities (``weight_grad_norm``,
        ``update_ratio`` with an optimizer). Reading never closes a step.
        """
        return self._all(0)

    @property
    def samples(self) -> pd.DataFrame:
        """One row per unit per sample per recorded step: the per-sample values."""
        return self._all(1)


class _Frame:
    """One micro-batch's rows: its reductions on their way to the host (one packed tensor, or
    every rank's joined), turned into numbers and (units, samples) DataFrames when first read."""

    __slots__ = ("_pending", "_rows", "_tables", "packed", "step")

    def __init__(self, metas: list, packed, scales: list, how: tuple, step: int = 0):
        self._pending, self._rows, self._tables = (metas, scales, how), None, [None, None]
        self.packed, self.step = packed, step

    def local(self, rank: int) -> "_Frame":
        """The same rows over ``rank``'s own samples (a per-rank sink's)."""
        metas, scales, how = self._pending    # before either table is read
        return _Frame([dict(m) for m in metas], self.packed.local(rank), scales, how, self.step)

    def __getitem__(self, which: int) -> pd.DataFrame:
        t = self._tables
        if t[which] is None:
            if self._rows is None:
                metas, scales, how = self._pending
                self._rows, self._pending = _host_rows(metas, self.packed, scales, how), None
            t[which] = (units_table if which == 0 else samples_table)(*self._rows)
            if which == 1 and hasattr(self.packed, "sample_ranks"):   # whose sample each row is
                df = t[1]
                df.insert(df.columns.get_loc("sample") + 1, "rank",
                          np.tile(self.packed.sample_ranks(), len(self._rows[0])))
            if t[1 - which] is not None:
                self._rows = self.packed = None
        return t[which]


def _host_rows(metas: list, packed, scales: list, how: tuple) -> tuple:
    """(metas, per-sample arrays, columns, B): unscaled, derived, one-number columns in the metas."""
    quantities, cancel_tol, scalar_cols, columns, per_pass_weights = how
    raw, sc, B = unpack(packed) if isinstance(packed, Packed) else packed.unpack()
    for q in quantities:
        q.finish(sc)
    for sl, s in scales:
        unscale(raw, sl, float(s))
        if per_pass_weights and "weight_grad_norm" in sc:
            sc["weight_grad_norm"][sl] /= float(s)
    n = len(metas)
    top_rows = np.array([i for i, meta in enumerate(metas) if meta["is_top"]])
    top = None
    if "grad_norm" in raw:   # ||dE/dx_L|| of each row's own pass
        owner = np.searchsorted(top_rows, np.arange(n))
        top = raw["grad_norm"][top_rows[owner]]
    numel = np.array([_numel(meta["x_shape"]) for meta in metas], dtype=float)
    ctx = Derive(numel, top, cancel_tol)
    for q in quantities:
        q.derive(raw, ctx)
    for k in scalar_cols:
        if k in sc:
            for meta, v in zip(metas, sc[k]):
                meta[k] = v
    return metas, raw, columns, B or 1


class _Frames:
    """The micro-batches written together (one step), read as one pair of tables."""

    __slots__ = ("_parts", "_cat")

    def __init__(self, parts: list):
        self._parts, self._cat = parts, [None, None]

    def __getitem__(self, which: int) -> pd.DataFrame:
        if self._cat[which] is None:
            fs = [f[which] for f in self._parts]
            self._cat[which] = fs[0] if len(fs) == 1 else pd.concat(fs, ignore_index=True)
            if all(c is not None for c in self._cat):
                self._parts = []
        return self._cat[which]

    units = property(lambda self: self[0])
    samples = property(lambda self: self[1])


_NO_SAMPLES = pd.DataFrame()   # given to sinks whose uses_samples is False


def _release(m) -> None:
    """Drop a written micro-batch's references into the autograd graph.

    Each unit-input hook's closure holds its call; a call's gradient edges hold the
    graph's nodes, which hold the hooks: a cycle through C++ that ``gc`` cannot
    collect, which kept every traced model alive (the probe's ``--compare``).
    A backward that comes later is refused before it reads any of these.
    """
    m.last_out = m.top_pending = None
    m.entries.clear()
    for c in m.calls:
        c.entry = None
        c.x_edge = c.out_edge = c.y_edge = c.h_edge = c.link_edges = None
        c.direct = c.ref = c.direct_norm = None
        c.args, c.parts, c.coef = (), None, 1.0
        for a in ("path_graph", "path_stack"):
            if hasattr(c, a):
                setattr(c, a, None)
    m.calls = []    # each call names its micro-batch: without this, a cycle per step for gc's full pass


def _numel(shape: str) -> int:
    return int(np.prod([int(v) for v in shape.split("x")])) if shape else 1


def _names(calls: list, most: int = 8) -> str:
    """Unit names for a message: index and name, the first ``most`` of them."""
    out = [f"{c.index} ({c.info.name})" for c in calls[:most]]
    return ", ".join(out) + (f" and {len(calls) - most} more" if len(calls) > most else "")
