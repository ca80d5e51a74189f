"""The probe: one traced step of a freshly initialised (or trained) network, reported.

``run_probe(ProbeConfig(model="resnet1001"))`` builds the network at a fixed
seed, takes a batch, runs one traced forward/backward (``trace_once``, the one
function the figures and benchmarks also call) and returns the tables and
summary; ``report_dict`` / ``format_report`` turn them into words and numbers,
``probe_figure`` (:func:`gradflow.plot.probe_overview`) into a figure,
``write_outputs`` into files. The CLI is ``python -m gradflow.probe`` (:mod:`gradflow.cli.probe`).
Names are imported on first use, so that the command line starts fast.
"""
from gradflow.utils.lazy import lazy_exports

_EXPORTS = {
    **{n: "config" for n in ("COMPARE_SETS", "TABLE1", "TABLE2", "ProbeConfig", "parse_compare", "parse_option")},
    "cifar_test": "inputs", "synthetic": "inputs", "build_model": "models",
    "prepare_out": "output", "write_outputs": "output", "format_report": "text", "report_dict": "report",
    **{n: "run" for n in ("ProbeResult", "VariantResult", "resolve_device", "run_probe")},
    **{n: "step" for n in ("Traced", "borrowed", "trace_at_init", "trace_once")},
}
__all__ = [*_EXPORTS, "probe_figure"]
_lazy_getattr, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


def __getattr__(name: str):
    if name == "probe_figure":  # matplotlib is imported where a figure is drawn, not with the probe
        from gradflow.plot import probe_overview
        return probe_overview
    return _lazy_getattr(name)
