"""Hook-based instrumentation of residual networks: find units, record, split."""
from .discover import UnitInfo, find_units
from .recorder import Tracer, trace
from .tables import QUANTITIES
from .schedule import Schedule, at, every, log_spaced

__all__ = ["trace", "Tracer", "find_units", "UnitInfo", "Schedule", "every", "log_spaced", "at",
           "QUANTITIES"]
