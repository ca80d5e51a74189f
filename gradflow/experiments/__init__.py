"""Experiments: the paper's tables as rows x seeds of runs (``plan``, ``runner``, ``results``,
``ordering``), the lesion study (``lesion``) and Xiong et al.'s Theorem 1 measured (``xiong``).

``python -m gradflow experiment table2 --scale laptop --data DIR`` (:mod:`gradflow.cli.experiment`).
Names are imported on first use: the lesion study does not load the trainer's configuration.
"""
from gradflow.utils.lazy import lazy_exports

_EXPORTS = {
    **{n: "planning" for n in ("EXPERIMENTS", "Row", "RunSpec", "Scale", "experiment_rows", "make_scale", "plan",
                           "select_rows")},
    **{n: "results" for n in ("draw_figures", "final_error", "results_table", "write_table")},
    **{n: "runner" for n in ("Outcome", "command_for", "device_slots", "execute", "run_state")},
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
