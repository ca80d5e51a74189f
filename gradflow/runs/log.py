"""Writing a run folder's logs: rows appended whole, cut back on resume (layout: gradflow.runs.layout).

Only rank 0 writes. Guarantees: JSON files and the checkpoint are replaced atomically; a log
row is appended whole or not at all (a failed append is cut back); resume keeps exactly the
rows the checkpoint vouches for and replaces the logs atomically. The log's columns and its
reader (``COLUMNS``, ``TIMING``, ``read_log``) live in :mod:`gradflow.runs.layout` and are
re-exported here.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from gradflow.errors import GradflowError
from gradflow.utils.io import atomic_write, atomic_write_text, json_safe, json_text
from gradflow.utils.provenance import code_version  # noqa: F401  (moved down: the probe and the figures record it too)
from gradflow.runs.layout import COLUMNS, FILES, TIMING, read_log  # noqa: F401  (re-exported: the format and its reader)


def default_name(model: str, dataset: str, preset: Optional[str]) -> str:
    return f"{preset or model}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json_text(obj))


def _append_whole(paths_and_writers: list[tuple[Path, Callable[[Any], None]]]) -> None:
    """Append to several files, all or nothing: on any error (a full disk) each is cut back to its old size."""
    sizes = [(p, p.stat().st_size if p.exists() else None) for p, _ in paths_and_writers]
    try:
        for path, write in paths_and_writers:
            with open(path, "a", newline="") as f:
                write(f)
                f.flush()
    except BaseException:
        for path, size in sizes:
            try:
                if size is None:
                    path.unlink(missing_ok=True)
                else:
                    os.truncate(path, size)  # shrinking needs no free space
            except OSError:
                pass
        raise


class RunLog:
    """Appends log rows to log.jsonl and log.csv (and probe tables to probe.csv) in ``run_dir``.

    ``rows`` and ``probe_rows`` count what is on disk; the checkpoint stores them,
    and :meth:`restore` keeps exactly that many on resume.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.jsonl, self.csv = self.run_dir / FILES["log"], self.run_dir / FILES["log_csv"]
        self.probe = self.run_dir / FILES["probe"]
        self.paths = self.run_dir / FILES["paths"]
        self.rows, self.probe_rows, self.paths_rows = 0, 0, 0

    def append(self, row: dict[str, Any]) -> None:
        row = {k: json_safe(row.get(k)) for k in COLUMNS}
        new = not self.csv.exists() or self.csv.stat().st_size == 0

        def write_csv(f) -> None:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerow({k: "" if v is None else v for k, v in row.items()})
        _append_whole([(self.jsonl, lambda f: f.write(json.dumps(row) + "\n")), (self.csv, write_csv)])
        self.rows += 1

    def append_probe(self, table, iteration: int) -> None:
        """Append a tracer's per-unit table (a DataFrame) to probe.csv with an ``iteration`` column."""
        self.probe_rows += _append_table(self.probe, table, iteration)

    def append_paths(self, table, iteration: int) -> None:
        """Append a tracer's path-length table (``tr.paths``) to paths.csv with an ``iteration`` column."""
        self.paths_rows += _append_table(self.paths, table, iteration)

    def truncate(self, last_iteration: int) -> None:
        """Keep only rows up to ``last_iteration``; the replacement is on disk before the old logs go."""
        keep = [r for r in read_log(self.run_dir) if r["iteration"] <= last_iteration]
        self._rewrite(keep)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps({k: json_safe(r.get(k)) for k in COLUMNS}) + "\n" for r in rows)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\r\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r.get(k) for k in COLUMNS})
        atomic_write(self.jsonl, lambda f: f.write(text.encode()), fsync=True)
        atomic_write(self.csv, lambda f: f.write(buf.getvalue().encode()), fsync=True)
        self.rows = len(rows)

    def restore(self, step: int, log_rows: Optional[int], probe_rows: Optional[int],
                paths_rows: Optional[int] = None) -> list[str]:
        """Cut every log back to what the checkpoint at iteration ``step`` vouches for (resume).

        Args:
            step: the checkpoint's iteration.
            log_rows, probe_rows, paths_rows: rows of log.jsonl, probe.csv and paths.csv on disk
                when it was saved
                (None for checkpoints written before gradflow counted them: then rows are
                kept by iteration, and a half-written last line is dropped).

        Returns:
            One line per change made, for the user (nothing is dropped silently).

        Raises:
            GradflowError if a file is damaged inside the part the checkpoint vouches for.
        """
        notes = []
        lines, tail = _complete_lines(self.jsonl)
        rows = []
        for i, line in enumerate(lines[:log_rows] if log_rows is not None else lines):
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("iteration"), int):
                    raise ValueError("not a log row")
            except ValueError as e:
                if log_rows is None and i == len(lines) - 1:
                    tail = True
                    break
                raise GradflowError(
                    f"{self.jsonl} line {i + 1} is damaged ({str(e)[:80]}) inside the {log_rows or len(lines)} "
                    f"rows the checkpoint at iteration {step} vouches for: the log cannot be trusted. "
                    "Restore log.jsonl from a copy, or start the run again") from None
            if row["iteration"] > step:
                if log_rows is None:
                    break
                raise GradflowError(f"{self.jsonl} line {i + 1} is iteration {row['iteration']}, after the "
                                    f"checkpoint's {step}: this log belongs to another run; start the run again")
            rows.append(row)
        if log_rows is not None and len(rows) < log_rows:
            raise GradflowError(f"{self.jsonl} holds {len(rows)} whole rows but the checkpoint at iteration "
                                f"{step} vouches for {log_rows}: rows were lost (the file was truncated or "
                                "replaced). Restore it from a copy, or start the run again")
        dropped = len(lines) - len(rows)
        self._rewrite(rows)  # always: log.csv is rebuilt from the JSONL rows, whatever happened to it
        if dropped:
            notes.append(f"dropped {dropped} log row(s) written after the checkpoint at iteration {step}")
        if tail:
            notes.append(f"dropped a half-written last line of {self.jsonl.name} (an interrupted append)")
        more, self.probe_rows = self._restore_table(self.probe, step, probe_rows)
        notes += more
        more, self.paths_rows = self._restore_table(self.paths, step, paths_rows)
        return notes + more

    def _restore_table(self, path: Path, step: int, rows: Optional[int]) -> tuple[list[str], int]:
        """Cut a per-probe CSV table (probe.csv, paths.csv) back to the rows the checkpoint vouches for.

        Returns (notes, rows kept).
        """
        if not path.exists():
            if rows:
                raise GradflowError(f"{path} is missing but the checkpoint at iteration {step} vouches "
                                    f"for {rows} of its rows: restore it, or start the run again")
            return [], 0
        lines, tail = _complete_lines(path)
        if not lines:
            keep: list[bytes] = []
        else:
            header, body = lines[0], lines[1:]
            width = len(next(csv.reader([header.decode()])))
            keep = [header]
            for i, line in enumerate(body if rows is None else body[:rows]):
                fields = next(csv.reader([line.decode(errors="replace")]), [])
                good = len(fields) == width
                if good and rows is None:
                    try:
                        if int(fields[0]) >= step:  # the probe of iteration i runs before update i + 1
                            break
                    except ValueError:
                        good = False
                if not good:
                    if rows is None and i == len(body) - 1:
                        tail = True
                        break
                    raise GradflowError(
                        f"{path} line {i + 2} is damaged inside the rows the checkpoint at iteration "
                        f"{step} vouches for: restore {path.name} from a copy, or start the run again")
                keep.append(line)
            if rows is not None and len(keep) - 1 < rows:
                raise GradflowError(f"{path} holds {len(keep) - 1} whole rows but the checkpoint at "
                                    f"iteration {step} vouches for {rows}: rows were lost; restore it "
                                    "from a copy, or start the run again")
        dropped = max(len(lines) - len(keep), 0)
        if dropped or tail:
            data = b"".join(line + b"\n" for line in keep)
            atomic_write(path, lambda f: f.write(data), fsync=True)
        notes = []
        if dropped:
            notes.append(f"dropped {dropped} row(s) of {path.name} written after the checkpoint at iteration {step}")
        if tail:
            notes.append(f"dropped a half-written last line of {path.name} (an interrupted append)")
        return notes, max(len(keep) - 1, 0)


def _append_table(path: Path, table, iteration: int) -> int:
    """Append a DataFrame to a CSV file whole, with a leading ``iteration`` column; returns its rows.

    Rows go under the file's own header, whatever the table's column order. A table with
    columns the file lacks (a run resumed by a newer gradflow that records more) rewrites the
    file atomically with them, empty in the earlier rows, and says so: no value is ever
    written under another column's name.
    """
    table = table.copy()
    table.insert(0, "iteration", iteration)
    header = _csv_header(path)
    if header and list(table.columns) != header:
        new = [c for c in table.columns if c not in header]
        if new:
            import warnings

            import pandas as pd
            old = pd.read_csv(path)
            merged = pd.concat([old, table], ignore_index=True)[header + new]
            atomic_write(path, lambda f: merged.to_csv(f, index=False), fsync=True)
            warnings.warn(f"{path}: the table now has column(s) {', '.join(new)} that the file's "
                          f"{len(old)} earlier row(s) lack: the file was rewritten with them, empty in "
                          "those rows", stacklevel=3)
            return len(table)
        table = table.reindex(columns=header)   # the file's order; a column the table lacks: empty
    _append_whole([(path, lambda f: table.to_csv(f, header=not header, index=False))])
    return len(table)


def _csv_header(path: Path) -> list[str]:
    """The column names of a CSV file's first line ([] for a missing or empty file)."""
    if not path.exists() or path.stat().st_size == 0:
        return []
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def _complete_lines(path: Path) -> tuple[list[bytes], bool]:
    """The file's newline-terminated lines (without the newline), and whether a partial line follows."""
    if not path.exists():
        return [], False
    data = path.read_bytes()
    parts = data.split(b"\n")
    tail = parts.pop()  # b"" when the file ends with a newline
    return [p.rstrip(b"\r") for p in parts], bool(tail)


def append_probe(run_dir: Path, table, iteration: int) -> None:
    """Append a tracer's per-unit table (a pandas DataFrame) to probe.csv with an ``iteration`` column."""
    RunLog(run_dir).append_probe(table, iteration)
