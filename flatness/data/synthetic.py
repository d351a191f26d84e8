"""A tiny, fixed synthetic classification set for fast tests (shaped like MNIST-1D)."""

from __future__ import annotations

import torch

from flatness.data.base import Dataset, Split


def load_synthetic(n_train: int = 256, n_test: int = 128, features: int = 40, classes: int = 10) -> Dataset:
    """Gaussian blobs: class ``c`` has mean ``mu_c`` (fixed seed 0), unit noise."""
    g = torch.Generator().manual_seed(0)
    means = 2.0 * torch.randn(classes, features, generator=g)

    def make(n: int) -> Split:
        y = torch.arange(n) % classes
        x = means[y] + torch.randn(n, features, generator=g)
        return Split(x, y)

    return Dataset("synthetic", make(n_train), make(n_test), num_classes=classes)
