"""Matrix-free spectra of a unit's Jacobian: see :mod:`gradflow.tracing.spectra` (re-exported here).

The code lives in tracing, which measures; theory only reads tables.
"""
from ..tracing.spectra import _Linearised, preserved_state, top_singular_value, unit_spectra  # noqa: F401

__all__ = ["preserved_state", "top_singular_value", "unit_spectra"]
