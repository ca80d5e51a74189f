"""Theory: predictions and fits, as pure functions of recorded tables (docs/theory.md).

``predict``: eq. (5)/(8) for the direct term where the paper's assumptions
hold, from the closed form; ``total``: predictions of the total gradient that
can fail (mean field, isotropy) and the gradient scale coefficient;
``profile``: exponential vs power-law fits per stage with bootstrap intervals
over samples, and "neither" where neither fits; ``robust``: ratios of batch
medians and degenerate samples; ``fits``: least-squares rates, variance growth,
and the one grouping of units by input shape every fit and figure uses;
``batchnorm``: Yang et al. 2019's BN explosion rate for plain BN-ReLU stacks;
``summary``: the network-level summary (``Tracer.summary()``); ``paths``:
path-length tables.
"""
from gradflow.theory.batchnorm import GAUSSIAN_INPUT_GAIN_SQ, RELU_GAIN_SQ, measured_growth, plain_bn_relu_growth
from gradflow.theory.fits import Fit, decay_rate, fit_slope, shape_groups, variance_growth
from gradflow.theory.predict import coverage, predict_direct, predicted_rate
from gradflow.theory.profile import fit_profile, profile_fits
from gradflow.theory.robust import degenerate_samples, median_ratios
from gradflow.theory.summary import per_unit, summarize
from gradflow.theory.total import gradient_scale, isotropy_total, meanfield_total, predict_total, with_predictions

__all__ = ["summarize", "predict_direct", "predicted_rate", "coverage", "decay_rate", "variance_growth",
           "fit_slope", "shape_groups", "per_unit", "Fit", "profile_fits", "fit_profile", "median_ratios",
           "degenerate_samples", "meanfield_total", "isotropy_total", "gradient_scale", "predict_total",
           "with_predictions", "plain_bn_relu_growth", "measured_growth", "RELU_GAIN_SQ", "GAUSSIAN_INPUT_GAIN_SQ"]
