"""gradflow: how signals and gradients travel through the depth of residual networks.

Built around He et al. 2016, "Identity Mappings in Deep Residual Networks".
"""
from .errors import GradflowError
from .registry import create_model, list_models, model_inputs, model_options, register_model
from . import theory  # noqa: F401  (gradflow.theory.* without a second import)
from .tracing import Tracer, find_units, trace, units
from .training import load_checkpoint, train

__version__ = "0.1.0"

__all__ = ["create_model", "list_models", "model_inputs", "model_options", "register_model", "GradflowError",
           "trace", "Tracer", "find_units", "units", "__version__"]
__all__ += ["load_checkpoint", "train"]
