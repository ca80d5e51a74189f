"""Theory: the paper's predictions and fitted rates, as pure functions of recorded tables.

``predict``: eq. (5)/(8) beside the measured direct term; ``fits``: rates across
depth with confidence intervals, variance growth, and the one grouping of units
by input shape every fit and figure uses; ``summary``: the network-level summary
(``Tracer.summary()``); ``jacobian``: matrix-free Jacobian spectra (imported
where used: it needs autograd, not tables).
"""
from gradflow.theory.fits import Fit, decay_rate, fit_slope, shape_groups, variance_growth
from gradflow.theory.predict import predict_direct, predicted_rate
from gradflow.theory.summary import per_unit, summarize

__all__ = ["summarize", "predict_direct", "predicted_rate", "decay_rate", "variance_growth",
           "fit_slope", "shape_groups", "per_unit", "Fit"]
