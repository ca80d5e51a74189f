"""The paper's experiments as one command: rows x seeds of runs, then a results table and figures.

``python -m gradflow.experiment table2 --scale laptop --data DIR`` (see gradflow/experiment.py).
"""
from .plan import EXPERIMENTS, Row, RunSpec, Scale, experiment_rows, make_scale, plan, select_rows
from .results import draw_figures, final_error, results_table, write_table
from .runner import Outcome, command_for, device_slots, execute, run_state

__all__ = ["EXPERIMENTS", "Row", "RunSpec", "Scale", "experiment_rows", "make_scale", "plan",
           "select_rows", "results_table", "write_table", "draw_figures", "final_error", "Outcome",
           "command_for", "device_slots", "execute", "run_state"]
