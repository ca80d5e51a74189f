"""The run folder as a place one process trains in: the lock, stale temporaries, starting over.

``open_fresh`` makes (or takes over) the folder of a new run; ``open_existing``
locks the folder of a run to resume. Both remove the ``.<name>.*.tmp`` files an
interrupted atomic write left behind, once the lock says nobody else is writing.
"""
from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Optional

from gradflow.errors import GradflowError
from gradflow.runs.layout import FILES

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

FINAL = ("ok", "fail", "diverged")   # statuses of a run that ended; it is never started over
RUN_FILES = tuple(FILES.values())   # what starting over removes: every file the trainer writes


class RunLock:
    """An exclusive lock on a run folder while a process trains in it (``fcntl.flock`` on ``.lock``).

    The lock file says who holds it (pid, host, start time); the lock itself goes
    with the process, so a killed run leaves no stale lock. Where flock does not
    exist (Windows) the run says so once and goes on unlocked.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._f = None

    def acquire(self) -> "RunLock":
        if fcntl is None:
            warnings.warn("this platform has no fcntl.flock: the run folder is not locked; "
                          "do not train twice in it at once", stacklevel=2)
            return self
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            try:
                h = json.loads(holder)
                who = f"process {h['pid']} on {h['host']} (started {h['started']})"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise GradflowError(f"run folder {self.path.parent} is in use: {who} is training in it. "
                                "Wait for it to finish or stop it; two processes must not train in "
                                "one folder") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        f.flush()
        self._f = f
        return self

    def release(self) -> None:
        if self._f is not None:
            self._f.close()  # closing drops the flock
            self._f = None


def clean_temporaries(run_dir: Path) -> list[str]:
    """Remove ``.<name>.*.tmp`` files that an interrupted atomic write left behind; their names.

    Call only while holding the folder's lock: then no write of ours is in flight.
    """
    gone = []
    for p in Path(run_dir).glob(".*.tmp"):
        try:
            p.unlink()
            gone.append(p.name)
        except OSError:
            pass
    return sorted(gone)


def holder(run_dir: str | Path) -> Optional[dict]:
    """Who trains in ``run_dir`` now: the lock holder's {pid, host, started}, or None if nobody.

    A status.json saying ``running`` with no holder means the process died without a
    word (SIGKILL, power loss): ``--resume`` continues it. (Checking takes the lock for
    an instant; a trainer starting in that instant is told the folder is in use.)
    """
    path = Path(run_dir) / ".lock"
    if fcntl is None or not path.exists():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            try:
                return json.loads(f.read())
            except ValueError:
                return {"pid": None, "host": None, "started": None}
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return None


def read_status(run_dir: Path) -> dict:
    """status.json as a dict ({} when missing or unreadable)."""
    try:
        return json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def open_fresh(out_dir: str, name: str) -> tuple[Path, RunLock, list[str]]:
    """Create and lock ``out_dir/name`` for a new run: (folder, lock, notes for the user).

    A folder that holds a run killed before its first checkpoint (no checkpoint.pt,
    not finished, nobody training, nothing in it but the trainer's own files: it may
    have been killed before config.json was written) is started over; any other
    existing folder is refused with the way to continue it.
    """
    path = Path(out_dir) / name
    notes: list[str] = []
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
        created = True
    except FileExistsError:
        created = False
    except OSError as e:
        raise GradflowError(f"cannot write the run folder {path} ({e.strerror}): "
                            "pass a writable --out-dir") from None
    if not created:
        status = read_status(path).get("status")
        restartable = (path.is_dir() and not (path / FILES["checkpoint"]).exists()
                       and status not in FINAL and only_run_files(path))
        if not restartable:
            raise GradflowError(f"run folder {path} already exists: pass --resume {path} to continue it, "
                                "or another --run-name")
    try:
        lock = RunLock(path).acquire()
    except OSError as e:
        raise GradflowError(f"cannot write the run folder {path} ({e.strerror}): "
                            "pass a writable --out-dir") from None
    if not created:
        gone = [n for n in RUN_FILES if (path / n).exists()]
        for n in gone:
            (path / n).unlink()
        if gone:
            notes.append(f"{path} holds a run that stopped before its first checkpoint (status "
                         f"{status or 'unknown'}): starting it over; removed {', '.join(gone)}")
        else:
            notes.append(f"{path} exists and holds no run file: the run starts in it")
    notes += _temporaries_note(path)
    return path, lock, notes


def only_run_files(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds nothing but what the trainer writes (its files, .lock, temporaries)."""
    return all(p.name in RUN_FILES or p.name == ".lock" or (p.name.startswith(".") and p.name.endswith(".tmp"))
               for p in Path(run_dir).iterdir())


def open_existing(run_dir: Path) -> tuple[RunLock, list[str]]:
    """Lock the folder of a run to resume: (lock, notes)."""
    if not Path(run_dir).is_dir():
        raise GradflowError(f"--resume {run_dir}: no such run folder")
    lock = RunLock(run_dir).acquire()
    return lock, _temporaries_note(run_dir)


def _temporaries_note(run_dir: Path) -> list[str]:
    gone = clean_temporaries(run_dir)
    return [f"removed {len(gone)} temporary file(s) an interrupted write left in {run_dir}: "
            f"{', '.join(gone)}"] if gone else []
