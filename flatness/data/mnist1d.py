"""MNIST-1D (Greydanus & Kobak, 2020), generated offline and cached.

The data come from ``mnist1d.data.make_dataset(get_dataset_args())`` with
the package's default arguments: 4,000 training and 1,000 test sequences of
40 features, 10 classes. We call ``make_dataset`` directly because
``get_dataset(download=True)`` first tries the network (with no timeout) and
writes a pickle into the current folder. Local generation reproduces the
published dataset file exactly. The result is cached as ``mnist1d.npz`` in
:func:`flatness.data.cache.cache_dir`.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from flatness.data.base import Dataset, Split
from flatness.data.cache import cache_dir

CACHE_NAME = "mnist1d_v1.npz"


def _generate() -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


def _read_or_make() -> dict[str, np.ndarray]:
    path = cache_dir() / CACHE_NAME
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is regenerated below
    arrays = _generate()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs a regeneration next time
    return arrays


def load_mnist1d() -> Dataset:
    """MNIST-1D as float32 inputs of shape (N, 40) and int64 labels."""
    a = _read_or_make()
    train = Split(torch.from_numpy(a["x"]).float(), torch.from_numpy(a["y"]).long())
    test = Split(torch.from_numpy(a["x_test"]).float(), torch.from_numpy(a["y_test"]).long())
    return Dataset("mnist1d", train, test, num_classes=10)
