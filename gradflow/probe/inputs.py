"""The probe's input batches: a seeded synthetic batch, or CIFAR test images.

Synthetic: N(0, 1) images and uniform labels, as in docs/theory.md, section 6, drawn
from a generator seeded by the probe's seed (batch ``i`` is the same whatever
the model). CIFAR: the test split of the python-pickle release (``test_batch``
for CIFAR-10, ``test`` for CIFAR-100), read alone (the training files are not
needed), normalised per channel with the test images' own mean and std.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from gradflow.data.cifar import CIFAR, channel_stats, normalise, read_cifar_file
from gradflow.errors import GradflowError

LABEL_RANGE = 2 ** 20  # synthetic labels are drawn in [0, LABEL_RANGE) and taken mod the classes


@dataclass
class Inputs:
    """Where the batches come from, and the batches: (images [B, 3, S, S] float32, labels [B] int64),
    or (token ids [B, T] int64, targets [B, T] int64) for models that take tokens."""

    description: str
    dataset: Optional[str]       # "cifar10", "cifar100" or None (synthetic)
    batches: list[tuple[Tensor, Tensor]]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(self.batches)


def synthetic(batch_size: int, batches: int, image_size: int, seed: int) -> Inputs:
    """``batches`` batches of N(0, 1) images [B, 3, S, S] with labels in [0, LABEL_RANGE)."""
    gen = torch.Generator().manual_seed(seed)
    out = [(torch.randn(batch_size, 3, image_size, image_size, generator=gen),
            torch.randint(0, LABEL_RANGE, (batch_size,), generator=gen)) for _ in range(batches)]
    return Inputs(f"synthetic N(0,1) images, {batches} x {batch_size} at {image_size}x{image_size}, "
                  f"seed {seed}", None, out)


def synthetic_tokens(batch_size: int, batches: int, seq_len: int, vocab_size: int, seed: int) -> Inputs:
    """``batches`` batches of uniform random token ids [B, T] and uniform random targets [B, T] over the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    out = [(torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen),
            torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen)) for _ in range(batches)]
    return Inputs(f"synthetic uniform random token ids and targets over {vocab_size} ids, {batches} x "
                  f"{batch_size} sequences of {seq_len} tokens, seed {seed}", None, out)


def cifar_test(root: str, batch_size: int, batches: int, image_size: int) -> Inputs:
    """The first ``batches * batch_size`` CIFAR test images under ``root``, resized if the model wants."""
    dataset, path = find_test_file(Path(root).expanduser())
    images, labels = read_test_file(path, CIFAR[dataset]["labels"])
    need = batch_size * batches
    if len(labels) < need:
        raise GradflowError(f"{path} holds {len(labels)} test images; --batch-size {batch_size} x "
                            f"--batches {batches} needs {need}")
    mean, std = channel_stats(images, f"the test images in {path}")
    x = normalise(images[:need], mean, std)
    if image_size != 32:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = labels[:need]
    out = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, need, batch_size)]
    name = "CIFAR-10" if dataset == "cifar10" else "CIFAR-100"
    return Inputs(f"{name} test images from {path}, {batches} x {batch_size}"
                  + (f" resized to {image_size}x{image_size}" if image_size != 32 else ""), dataset, out)


def find_test_file(root: Path) -> tuple[str, Path]:
    """(dataset, test file) in ``root`` or its release sub-folder; a clear error otherwise."""
    if not root.exists():
        raise GradflowError(f"--data {root}: no such folder; pass the CIFAR python folder "
                            "(cifar-10-batches-py/ or cifar-100-python/) or the folder holding it")
    for dataset, spec in CIFAR.items():
        test = spec["test"][0][0]
        for folder in (root, root / spec["folder"]):
            if (folder / test).is_file():
                return dataset, folder / test
    raise GradflowError(f"--data {root} is not a CIFAR python folder: expected a 'test_batch' (CIFAR-10) "
                        "or 'test' (CIFAR-100) file in it or in its cifar-10-batches-py/ or "
                        "cifar-100-python/ sub-folder (extract cifar-10-python.tar.gz there)")


def read_test_file(path: Path, label_key: str) -> tuple[Tensor, Tensor]:
    """uint8 images [N, 3, 32, 32] and int64 labels [N] from one pickled CIFAR file.

    Read with the trainer's restricted unpickler (gradflow.data.cifar.read_cifar_file):
    a crafted file cannot run code, and images that are not uint8 [N, 3072] are refused.
    """
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise GradflowError(f"cannot read {path} ({e.strerror}): pass a readable CIFAR python folder") from None
    x, y = read_cifar_file(blob, path.name, label_key, path.parent)
    if len(y) == 0:
        raise GradflowError(f"{path} holds no images: not a CIFAR test file")
    return x, y
