"""The model zoo: every residual unit of the paper at depths 20 to 1202."""
from gradflow.models.resnet import CifarResNet, cifar_resnet
from gradflow.models.units import (DOWNSAMPLE_TYPES, SHORTCUT_TYPES, UNIT_TYPES, Gate, PadShortcut,
                    ResidualUnit, ScaledSum, Sum, UnitSpec, unit_options, unit_spec)
from gradflow.models.paper import PaperRow, compare_set, paper_rows
from gradflow.models.transformer import (TRANSFORMER_UNITS, GPT, ViT, TransformerBlock, TransformerSpec,
                          TransformerUnit)
from gradflow.models import transformer_zoo  # noqa: F401  (registers gpt-* and vit-cifar-*)
from gradflow.models import plain  # noqa: F401  (registers plain20 ... plain110, the lesion study's contrast)

__all__ = ["CifarResNet", "cifar_resnet", "ResidualUnit", "UnitSpec", "Sum", "ScaledSum", "Gate",
           "PadShortcut", "UNIT_TYPES", "SHORTCUT_TYPES", "DOWNSAMPLE_TYPES"]
__all__ += ["unit_options", "unit_spec", "PaperRow", "paper_rows", "compare_set"]
__all__ += ["GPT", "ViT", "TransformerBlock", "TransformerSpec", "TransformerUnit", "TRANSFORMER_UNITS"]
