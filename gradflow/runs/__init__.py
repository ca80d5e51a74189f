"""The run folder, in one place: its layout, writing its logs, the lock, checkpoints, reading it back.

``layout``: the files and the log's columns; ``log``: appending rows whole and cutting them back on
resume; ``folder``: the lock, stale temporaries, starting over; ``checkpoint``: the checkpoint format,
atomic saves and ``load_checkpoint``; ``read``: folders into tidy tables for figures and notebooks
(``read_run``, ``read_runs``, ``logs``, re-exported here).
"""
from gradflow.utils.lazy import lazy_exports

_EXPORTS = {n: "read" for n in ("Run", "read_run", "read_runs", "logs", "read_log_table", "read_probe", "read_paths")}
_EXPORTS.update(load_checkpoint="checkpoint", save_checkpoint="checkpoint", read_checkpoint="checkpoint")
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
