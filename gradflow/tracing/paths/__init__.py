"""dE/dx_l split by path length (Veit, Wilber, Belongie 2016), exactly.

``components``: :func:`path_components` and :func:`sample_paths`, the user-facing split;
``carrier``: the carrier of the components g^(k) through the backward pass (the tracer's
``paths=`` uses it); ``fast``, ``stack``, ``vjp``: its fast route, the component stack and the
batched vector-Jacobian products. The tables built on the results are :mod:`gradflow.theory.paths`.
"""
from gradflow.utils.lazy import lazy_exports

_EXPORTS = {"path_components": "components", "sample_paths": "components", "PathResult": "components",
            "PathCarrier": "carrier", "PathTracker": "carrier", "UnitGraph": "carrier", "n_paths": "carrier",
            "PathStack": "stack"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
