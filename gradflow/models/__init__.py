"""The model zoo: every residual unit of the paper at depths 20 to 1202."""
from .resnet import CifarResNet, cifar_resnet
from .units import (DOWNSAMPLE_TYPES, SHORTCUT_TYPES, UNIT_TYPES, Gate, PadShortcut,
                    ResidualUnit, ScaledSum, Sum, UnitSpec)

__all__ = ["CifarResNet", "cifar_resnet", "ResidualUnit", "UnitSpec", "Sum", "ScaledSum", "Gate",
           "PadShortcut", "UNIT_TYPES", "SHORTCUT_TYPES", "DOWNSAMPLE_TYPES"]
