"""The probe: one traced step of a freshly initialised (or trained) network, reported.

``run_probe(ProbeConfig(model="resnet1001"))`` builds the network at a fixed
seed, takes a batch, runs one traced forward/backward (``trace_once``, the one
function the figures and benchmarks also call) and returns the tables and
summary; ``report_dict`` / ``format_report`` turn them into words and numbers,
``probe_figure`` (:func:`gradflow.plot.probe_overview`) into a figure,
``write_outputs`` into files. The CLI is ``python -m gradflow.probe``.
"""
from .config import COMPARE_SETS, TABLE1, TABLE2, ProbeConfig, parse_compare, parse_option
from .inputs import cifar_test, synthetic
from .models import build_model
from .output import prepare_out, write_outputs
from .report import format_report, report_dict
from .run import ProbeResult, VariantResult, resolve_device, run_probe
from .step import Traced, borrowed, trace_at_init, trace_once

__all__ = ["ProbeConfig", "run_probe", "ProbeResult", "VariantResult", "format_report", "report_dict",
           "probe_figure", "write_outputs", "prepare_out", "build_model", "synthetic", "cifar_test",
           "parse_compare", "parse_option", "resolve_device", "COMPARE_SETS", "TABLE1", "TABLE2",
           "trace_once", "trace_at_init", "Traced", "borrowed"]


def __getattr__(name: str):
    if name == "probe_figure":  # matplotlib is imported where a figure is drawn, not with the probe
        from ..plot import probe_overview
        return probe_overview
    raise AttributeError(f"module 'gradflow.probing' has no attribute {name!r}")
