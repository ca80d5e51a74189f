"""BatchNorm's gradient explosion without shortcuts (Yang et al. 2019), as a prediction that can fail.

Yang, Pennington, Rao, Sohl-Dickstein and Schoenholz ("A Mean Field Theory of
Batch Normalization", ICLR 2019) show that a deep BN network without skip
connections has exploding gradients at initialisation whatever the weight
variance, at a rate set by the nonlinearity and the batch size. For ReLU in the
limit of large width and batch the rate follows in three lines. A layer
``x' = relu(BN(W x))`` with ``W`` of i.i.d. entries of variance ``s2 / n``:

* backward through ``W``: ``||W^T v||^2 = s2 ||v||^2``;
* through BN: division by the batch standard deviation of ``h = W x``, whose
  variance is ``s2 Var_batch(x)``; the two directions BN projects out (the batch
  mean and ``h`` itself) are 2 of ``B``, nothing at large batch;
* through ReLU: ``E[relu'(z)^2] = 1/2`` for ``z ~ N(0, 1)``.

So ``||dE/dx||^2 / ||dE/dx'||^2 = (1/2) / Var_batch(x)``. Where ``x`` is itself
a ReLU of a standardised input, ``Var_batch(x) = 1/2 - 1/(2 pi)`` and the ratio is
``pi / (pi - 1) = 1.467`` per layer (:data:`RELU_GAIN_SQ`), independent of
``s2`` (BN removes the weight scale): the gradient norm grows by
``sqrt(pi / (pi - 1)) = 1.211`` per layer toward the input. A standard Gaussian
input (the first layer) has ``Var_batch(x) = 1`` and ratio ``1/2``. At small
batch the projected-out directions matter and the explosion is faster (Yang et
al.'s batch-size dependence): at width 512, batch 16 gives about 1.6 per layer.

The measured counterpart is the per-layer ratio of squared gradient norms; a
residual unit is not covered (its shortcut adds the identity to the Jacobian).
"""
from __future__ import annotations

import math

import numpy as np

RELU_GAIN_SQ = math.pi / (math.pi - 1)   # ||dE/dx||^2 growth per linear-BN-ReLU layer, large width and batch
GAUSSIAN_INPUT_GAIN_SQ = 0.5             # the same for a layer whose input is standard Gaussian


def plain_bn_relu_growth(layers: int) -> float:
    """Predicted ||dE/dx_l|| / ||dE/dx_{l+1}|| across ``layers`` linear-BN-ReLU layers (ReLU inputs).

    A plain unit of the zoo (conv-BN-ReLU twice, no shortcut) is ``layers=2``: 1.467.
    """
    return math.sqrt(RELU_GAIN_SQ) ** layers


def measured_growth(grad_norms: np.ndarray) -> np.ndarray:
    """Per-step growth toward the input of a profile of gradient norms ordered input -> output.

    ``grad_norms[l] / grad_norms[l + 1]``: the number :func:`plain_bn_relu_growth` predicts.
    """
    g = np.asarray(grad_norms, dtype=float)
    return g[:-1] / g[1:]
