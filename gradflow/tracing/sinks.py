"""Sinks: each recorded step's rows streamed as they are made.

A sink is any object with ``write(units, samples)`` (two DataFrames: the
step's rows of ``tr.units`` and ``tr.samples``), and optionally ``open(tracer)``
(called when the trace attaches) and ``close()`` (when it detaches). Pass them
as ``trace(model, sinks=[...])``; with ``history=0`` nothing stays in memory.
A sink with ``uses_samples = False`` is given an empty ``samples`` frame, and
the per-sample table is then not built for it (it costs as much as the rest).
Under a process group (:mod:`.distributed`) sinks write on rank 0 only, the
global batch's rows; one with ``per_rank = True`` writes on every rank, that
rank's own samples (a file sink then puts ``.rank<r>`` before its suffix).

* :class:`CSVSink` / :class:`JSONLSink`: one line per unit row, appended and
  flushed once per step, so memory stays bounded however long the run is.
  Each step is written with a single ``write`` call (a crash leaves whole
  steps, at most a torn last line that a reader skips).
* :class:`TensorBoardSink`: per-unit scalars through
  ``torch.utils.tensorboard``, grouped by stage (tag
  ``<column>.stage<s>/<unit name>``), and each column's profile over depth
  as a histogram whose buckets are the units (tag ``<column>/over_depth``:
  TensorBoard's histogram view then shows how the profile moves with the step).
"""
from __future__ import annotations

import csv
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from gradflow.errors import GradflowError
from gradflow.utils.io import json_safe


class Sink:
    """Base class: receives each written step's rows."""

    uses_samples: bool = True   # False: write() gets an empty samples frame (not built)
    per_rank: bool = False      # under a process group: write on every rank, its own samples

    def open(self, tracer: Any) -> None:
        pass

    def write(self, units: pd.DataFrame, samples: pd.DataFrame) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FunctionSink(Sink):
    """A sink that calls ``write(units, samples)`` (gradflow's trainer appends to probe.csv so)."""

    def __init__(self, write, per_rank: bool = False):
        self._write, self.per_rank = write, per_rank

    def write(self, units: pd.DataFrame, samples: pd.DataFrame) -> None:
        self._write(units, samples)


class _LineSink(Sink):
    """Shared by CSV and JSONL: a path, extra constant columns, samples or units."""

    def __init__(self, path, samples: bool = False, append: bool = False,
                 extra: Optional[dict] = None, per_rank: bool = False):
        self._path = Path(path)
        self.samples, self.append, self.per_rank = samples, append, per_rank
        self.extra = dict(extra or {})
        self._f = None
        self.rows = 0

    @property
    def uses_samples(self) -> bool:
        return self.samples

    @property
    def path(self) -> Path:
        """The file: with ``per_rank``, this rank's (``<stem>.rank<r><suffix>``, read when written)."""
        return rank_path(self._path) if self.per_rank else self._path

    def _file(self):
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and not self.append:
                self.path.unlink()
            self._f = open(self.path, "a", newline="")
        return self._f

    def _frame(self, units: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
        df = samples if self.samples else units
        if self.extra:
            df = df.copy()
            for i, (k, v) in enumerate(self.extra.items()):
                df.insert(i, k, v)
        return df

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class CSVSink(_LineSink):
    """Append each step's rows to a CSV file (``samples=True``: the per-sample table).

    Args:
        path: the file. Replaced when the trace starts, unless ``append=True``.
        samples: write ``tr.samples`` rows instead of ``tr.units`` rows.
        append: add to an existing file; its header is kept, and columns the
            file has no place for are named once in a warning.
        extra: constant columns put first (``{"iteration": 1200}``).
        per_rank: under a process group, every rank writes its own samples'
            rows to its own file, ``<stem>.rank<r><suffix>`` (default: rank 0
            writes the global batch's rows to ``path``).
    """

    def __init__(self, path, samples: bool = False, append: bool = False,
                 extra: Optional[dict] = None, per_rank: bool = False):
        super().__init__(path, samples, append, extra, per_rank)
        self.header: Optional[list] = None
        self._dropped: set = set()
        self._new = True          # the header line is still to be written

    def open(self, tracer: Any) -> None:
        if self.append and self.path.exists() and self.path.stat().st_size:
            with open(self.path, newline="") as f:
                self.header = next(csv.reader(f), None)
            self._new = False
        elif hasattr(tracer, "columns"):   # every column the trace can make, whatever comes first
            self.header = list(self.extra) + tracer.columns(samples=self.samples)

    def write(self, units: pd.DataFrame, samples: pd.DataFrame) -> None:
        df = self._frame(units, samples)
        if df.empty:
            return
        f = self._file()
        new = self._new
        self._new = False
        if self.header is None:
            self.header = list(df.columns)
        missing = [c for c in df.columns if c not in self.header and c not in self._dropped]
        if missing:   # said once per column
            warnings.warn(f"gradflow CSVSink {self.path}: the file's header has no column for "
                          f"{missing}; those values are not written to it (use a new file or "
                          "JSONLSink)", RuntimeWarning, stacklevel=2)
            self._dropped |= set(missing)
        buf = io.StringIO()
        df.reindex(columns=self.header).to_csv(buf, header=new, index=False)
        f.write(buf.getvalue())
        f.flush()
        self.rows += len(df)


class JSONLSink(_LineSink):
    """Append each step's rows to a JSON-lines file, one object per row (NaN as null).

    Args: as :class:`CSVSink`; columns may differ from row to row.
    """

    def open(self, tracer: Any) -> None:
        pass

    def write(self, units: pd.DataFrame, samples: pd.DataFrame) -> None:
        df = self._frame(units, samples)
        if df.empty:
            return
        cols = list(df.columns)
        lines = [json.dumps({c: json_safe(v) for c, v in zip(cols, row)}) for row in
                 df.itertuples(index=False, name=None)]
        f = self._file()
        f.write("\n".join(lines) + "\n")
        f.flush()
        self.rows += len(df)


def rank_path(path: Path) -> Path:
    """``path`` with ``.rank<r>`` before its suffix under a process group (as it is without one)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return path
    return path.with_name(f"{path.stem}.rank{dist.get_rank()}{path.suffix}")


DEFAULT_TB = ("grad_ratio", "direct_ratio", "x_rms", "r_norm", "weight_grad_norm", "update_ratio")


class TensorBoardSink(Sink):
    """Per-unit scalars grouped by stage, and profiles over depth, to TensorBoard.

    Args:
        log_dir: where a new ``SummaryWriter`` writes (ignored with ``writer``).
        writer: an existing ``torch.utils.tensorboard.SummaryWriter`` (a
            Lightning ``TensorBoardLogger``'s ``experiment``); it is not closed.
        columns: which columns of ``tr.units`` to log (those absent are skipped).
        histograms: also log each column's profile over depth.
        prefix: put before every tag (``"gradflow/"``).
        scalars: log the per-unit scalars (off: only the depth profiles).

    Micro-batches of one step are averaged; ``phase="eval"`` rows go under
    ``eval/``. The global step is the tracer's step.
    """

    uses_samples = False

    def __init__(self, log_dir: Optional[str] = None, writer: Any = None,
                 columns: Sequence[str] = DEFAULT_TB, histograms: bool = True,
                 prefix: str = "gradflow/", scalars: bool = True):
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise GradflowError("TensorBoardSink needs the tensorboard package: pip install "
                                    "'gradflow[tensorboard]' (or pip install tensorboard)") from e
            writer, self._own = SummaryWriter(log_dir=log_dir), True
        else:
            self._own = False
        self.writer = writer
        self.columns, self.histograms, self.prefix, self.scalars = tuple(columns), histograms, prefix, scalars

    def write(self, units: pd.DataFrame, samples: pd.DataFrame) -> None:
        if units.empty:
            return
        w = self.writer
        phases = units["phase"].to_numpy()
        groups = [(phases[0], units)] if (phases == phases[0]).all() else units.groupby("phase", sort=False)
        for phase, df in groups:
            pre = self.prefix + ("eval/" if phase == "eval" else "")
            step = int(df["step"].iloc[0])
            cols = [c for c in self.columns if c in df]
            if not cols:
                continue
            # one value per unit: the mean over micro-batches and backward passes
            if df["unit"].is_unique and df["unit"].is_monotonic_increasing:
                per = df   # one row per unit already (one micro-batch, one backward)
            else:
                per = df.groupby("unit", sort=True).agg({**{c: "mean" for c in cols},
                                                         "name": "first", "stage": "first"})
            scalars = []
            labels = list(zip(per["name"].tolist(), per["stage"].tolist()))
            for c in cols:
                vals = per[c].to_numpy(dtype=float)
                if self.scalars:
                    scalars += [(f"{pre}{c}.stage{stage}/{name}", v) for (name, stage), v in
                                zip(labels, vals.tolist()) if math.isfinite(v)]
                ok = np.isfinite(vals)
                if self.histograms and ok.any():
                    v = np.where(ok, np.abs(vals), 0.0)
                    depth = np.arange(len(v), dtype=float)
                    w.add_histogram_raw(f"{pre}{c}/over_depth", min=0.0, max=float(len(v) - 1),
                                        num=float(v.sum()), sum=float((depth * v).sum()),
                                        sum_squares=float((depth * depth * v).sum()),
                                        bucket_limits=(depth + 0.5).tolist(), bucket_counts=v.tolist(),
                                        global_step=step)
            self._scalars(scalars, step)

    def _scalars(self, items: list, step: int) -> None:
        """All of a step's scalars as one event (one add_scalar each costs ~0.1 ms)."""
        fw = getattr(self.writer, "_get_file_writer", None)
        if fw is None:
            for tag, v in items:
                self.writer.add_scalar(tag, v, step)
            return
        from tensorboard.compat.proto.summary_pb2 import Summary
        fw().add_summary(Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in items]), step)

    def close(self) -> None:
        self.writer.flush()
        if self._own:
            self.writer.close()
