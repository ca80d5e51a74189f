"""Hook-based instrumentation of residual networks: find units, record, split, stream.

The unit protocol (:mod:`gradflow.tracing.parts`), finding units (``discover``, ``fxgraph``,
``adapters``), the recorder (``recorder``, ``records``, ``writer``, ``tables``, ``carry``), the
quantities and schedules, sinks, Jacobian spectra, and the path-length split (``paths/``).
Names are imported on first use, so that the model zoo can import the unit protocol cheaply.
"""
from gradflow.utils.lazy import lazy_exports

_EXPORTS = {
    "UnitInfo": "discover", "find_units": "discover", "UnitList": "listing", "units": "listing",
    **{n: "quantities" for n in ("Backward", "Forward", "Quantity", "Weights", "Signal", "Branches", "Gradient",
                                 "Split", "WeightGradNorm", "UpdateRatio", "Spectra", "PRESETS")},
    "Tracer": "recorder", "trace": "recorder",
    **{n: "schedule" for n in ("Schedule", "at", "every", "log_spaced")},
    **{n: "sinks" for n in ("CSVSink", "FunctionSink", "JSONLSink", "Sink", "TensorBoardSink")},
    "QUANTITIES": "tables",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
