"""Data: CIFAR as uint8 tensors on the device, augmented in whole batches there (:mod:`gradflow.data.cifar`)."""
from gradflow.data.cifar import (CIFAR, SYNTHETIC, CifarArrays, DeviceCifar, load_cifar, synthetic_arrays,
                                 synthetic_cifar, write_cifar)

__all__ = ["CIFAR", "SYNTHETIC", "CifarArrays", "DeviceCifar", "load_cifar", "synthetic_arrays", "synthetic_cifar",
           "write_cifar"]
