"""Dataset container, loading by name, and fixed analysis batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flatness.errors import FlatnessError

DATASET_NAMES = ("mnist1d", "cifar10", "cifar100", "synthetic")

Augment = Callable[[Tensor, torch.Generator], Tensor]


Batch = Tensor | tuple[Tensor, ...] | dict[str, Tensor]


def map_batch(fn: Callable[[Tensor], Tensor], batch: Batch) -> Batch:
    """``fn`` applied to every tensor of a batch, keeping its structure (tensor, tuple or dict)."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: fn(v) for k, v in batch.items()}
    return tuple(fn(v) for v in batch)


def _tensors(batch: Batch) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    return list(batch.values()) if isinstance(batch, dict) else list(batch)


def _check_sizes(batch: Batch) -> None:
    tensors = _tensors(batch)
    sizes = {int(t.shape[0]) if t.dim() else -1 for t in tensors}
    if not tensors or len(sizes) != 1 or -1 in sizes:
        raise ValueError(f"the tensors of a split must share their first dimension, got sizes {sorted(sizes)}")


class Split:
    """One split held as tensors that share their first (sample) dimension.

    The built-in datasets hold inputs ``x`` (float32) and labels ``y``
    (int64): ``Split(x, y)``. A user's dataset keeps the structure of its
    samples: ``Split(tokens)`` (one tensor), ``Split(x, y, mask)`` (a tuple)
    or ``Split(input_ids=..., labels=...)`` (a dict); :meth:`take` and
    :func:`analysis_batches` hand batches out in that same structure, which is
    what a ``loss(model, batch)`` receives.
    """

    def __init__(self, *tensors: Tensor, **named: Tensor) -> None:
        if bool(tensors) == bool(named):
            raise TypeError("Split takes either positional tensors or named tensors, and at least one")
        self.fields: Batch = dict(named) if named else (tensors[0] if len(tensors) == 1 else tuple(tensors))
        _check_sizes(self.fields)

    @classmethod
    def of(cls, batch: Batch) -> Split:
        """A split holding ``batch`` exactly in its structure (a 1-tuple stays a 1-tuple)."""
        split = cls.__new__(cls)
        split.fields = dict(batch) if isinstance(batch, dict) else (batch if isinstance(batch, Tensor) else tuple(batch))
        _check_sizes(split.fields)
        return split

    @property
    def classic(self) -> bool:
        """Whether this is an ``(x, y)`` pair, the form that ``loss_fn(model(x), y)`` and accuracy use."""
        return isinstance(self.fields, tuple) and len(self.fields) == 2

    @property
    def x(self) -> Tensor:
        """The inputs of an ``(x, y)`` split (the first tensor of any other)."""
        return _tensors(self.fields)[0]

    @property
    def y(self) -> Tensor:
        """The targets of an ``(x, y)`` split."""
        if not self.classic:
            raise TypeError("this split is not an (inputs, targets) pair; use .fields or .take()")
        return self.fields[1]  # type: ignore[index]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, index: Tensor | slice) -> Batch:
        """The samples at ``index`` as one batch, in this split's structure."""
        return map_batch(lambda t: t[index], self.fields)

    def to(self, device: torch.device | str) -> Split:
        return Split.of(map_batch(lambda t: t.to(device), self.fields))

    def first(self, n: int | None) -> Split:
        """The first ``n`` samples in dataset order (all when ``n`` is None)."""
        if n is None:
            return self
        if n <= 0:
            raise FlatnessError(f"--samples must be a positive integer, got {n}")
        if n > len(self):
            raise FlatnessError(f"--samples {n} is more than the {len(self)} samples of the split")
        return Split.of(self.take(slice(0, n)))


@dataclass
class Dataset:
    """A named dataset: train and test splits, class count, training augmentation.

    Attributes:
        num_classes: classes of an ``(x, y)`` classification set; None when
            the targets are not class indices (regression, language models).
        augment: ``augment(x, generator) -> x`` applied to training batches on
            the training device (None for no augmentation).
    """

    name: str
    train: Split
    test: Split
    num_classes: int | None
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
    kwargs: dict[str, Any] | None = None,
) -> Dataset:
    """Load a dataset by registry name or from the user's own callable.

    Args:
        name: one of ``mnist1d``, ``cifar10``, ``cifar100``, ``synthetic``, or
            a callable spec ``package.module:fn`` / ``path/file.py:fn`` whose
            ``fn(**kwargs)`` returns ``(train, test)``: torch datasets,
            DataLoaders or iterables of batches (see :mod:`flatness.data.user`).
        data_dir: folder with the CIFAR python-pickle batches (CIFAR only).
        cutout: side of the cutout square for CIFAR training batches (0: off).
        augment: whether training batches of CIFAR get crop + flip.
        kwargs: keyword arguments of a callable spec (none for registry names).

    Raises:
        FlatnessError: unknown name, missing or malformed files, a callable
            that cannot be imported or returns something else than two datasets.

    Example:
        >>> ds = load_dataset("synthetic")
        >>> ds.train.x.shape, ds.num_classes
        (torch.Size([256, 40]), 10)
    """
    from flatness.hooks import is_callable_spec

    if is_callable_spec(name):
        from flatness.data.user import load_user_dataset

        return load_user_dataset(name, kwargs or {})
    if kwargs:
        raise FlatnessError(f"dataset {name!r} takes no keyword arguments, got {kwargs}")
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
    raise FlatnessError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)} or 'module:callable'")


def analysis_batches(
    split: Split,
    *,
    samples: int | None = None,
    batch_size: int = 1000,
    device: torch.device | str = "cpu",
) -> list[Batch]:
    """The first ``samples`` of a split as a list of device-resident batches.

    No shuffling and no augmentation: every caller that asks for the same
    ``samples`` sees exactly the same inputs, in the same order. Batches have
    the split's structure: ``(x, y)`` tuples for the built-in datasets.
    """
    if batch_size <= 0:
        raise FlatnessError(f"--batch-size must be a positive integer, got {batch_size}")
    part = split.first(samples).to(device)
    return [part.take(slice(i, i + batch_size)) for i in range(0, len(part), batch_size)]
