"""Dataset container, loading by name, and fixed analysis batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from flatness.errors import FlatnessError

DATASET_NAMES = ("mnist1d", "cifar10", "cifar100", "synthetic")

Augment = Callable[[Tensor, torch.Generator], Tensor]


@dataclass
class Split:
    """One split as two tensors: inputs ``x`` (float32) and labels ``y`` (int64)."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return self.y.shape[0]

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device))

    def first(self, n: int | None) -> Split:
        """The first ``n`` samples in dataset order (all when ``n`` is None)."""
        if n is None:
            return self
        if n <= 0:
            raise FlatnessError(f"--samples must be a positive integer, got {n}")
        if n > len(self):
            raise FlatnessError(f"--samples {n} is more than the {len(self)} samples of the split")
        return Split(self.x[:n], self.y[:n])


@dataclass
class Dataset:
    """A named dataset: train and test splits, class count, training augmentation.

    Attributes:
        augment: ``augment(x, generator) -> x`` applied to training batches on
            the training device (None for no augmentation).
    """

    name: str
    train: Split
    test: Split
    num_classes: int
    augment: Augment | None = None
    info: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def split(self, name: str) -> Split:
        if name == "train":
            return self.train
        if name == "test":
            return self.test
        raise FlatnessError(f"unknown split {name!r}; expected 'train' or 'test'")


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    cutout: int = 0,
    augment: bool = True,
) -> Dataset:
    """Load a dataset by name.

    Args:
        name: one of ``mnist1d``, ``cifar10``, ``cifar100``, ``synthetic``.
        data_dir: folder with the CIFAR python-pickle batches (CIFAR only).
        cutout: side of the cutout square for CIFAR training batches (0: off).
        augment: whether training batches of CIFAR get crop + flip.

    Raises:
        FlatnessError: unknown name, missing or malformed files.
    """
    if name == "mnist1d":
        from flatness.data.mnist1d import load_mnist1d

        return load_mnist1d()
    if name in ("cifar10", "cifar100"):
        from flatness.data.cifar import load_cifar

        if data_dir is None:
            raise FlatnessError(f"dataset {name!r} is read from disk: pass --data-dir with the python-pickle batches")
        return load_cifar(name, Path(data_dir), cutout=cutout, augment=augment)
    if name == "synthetic":
        from flatness.data.synthetic import load_synthetic

        return load_synthetic()
    raise FlatnessError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")


def analysis_batches(
    split: Split,
    *,
    samples: int | None = None,
    batch_size: int = 1000,
    device: torch.device | str = "cpu",
) -> list[tuple[Tensor, Tensor]]:
    """The first ``samples`` of a split as a list of device-resident batches.

    No shuffling and no augmentation: every caller that asks for the same
    ``samples`` sees exactly the same inputs, in the same order.
    """
    if batch_size <= 0:
        raise FlatnessError(f"--batch-size must be a positive integer, got {batch_size}")
    part = split.first(samples)
    x = part.x.to(device)
    y = part.y.to(device)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(part), batch_size)]
