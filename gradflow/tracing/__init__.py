"""Hook-based instrumentation of residual networks: find units, record, split, stream."""
from .discover import UnitInfo, find_units
from .listing import UnitList, units
from .quantities import (Backward, Forward, Quantity, Weights, Signal, Branches, Gradient, Split,
                         WeightGradNorm, UpdateRatio, Spectra, PRESETS)
from .recorder import Tracer, trace
from .schedule import Schedule, at, every, log_spaced
from .sinks import CSVSink, FunctionSink, JSONLSink, Sink, TensorBoardSink
from .tables import QUANTITIES

__all__ = ["trace", "Tracer", "find_units", "units", "UnitInfo", "UnitList", "Schedule", "every",
           "log_spaced", "at", "QUANTITIES", "Quantity", "Forward", "Backward", "Weights", "Signal",
           "Branches", "Gradient", "Split", "WeightGradNorm", "UpdateRatio", "Spectra", "PRESETS",
           "Sink", "CSVSink", "FunctionSink", "JSONLSink", "TensorBoardSink"]
