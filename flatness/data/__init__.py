"""Datasets held as tensors: MNIST-1D (embedded), CIFAR-10/100 (from disk), synthetic, or your own.

``load_dataset("mymod.py:data")`` calls your function and holds the
``(train, test)`` it returns as tensors, in the structure of your samples
(see :mod:`flatness.data.user`).

Every dataset is a :class:`~flatness.data.base.TensorDataset` pair (train,
test) with an optional on-device augmentation for training. Analysis code
uses :func:`analysis_batches`: the first ``N`` samples of a split, in dataset
order, never augmented, so every command sees the same samples.
"""

from flatness.data.base import DATASET_NAMES, Dataset, Split, analysis_batches, load_dataset

__all__ = ["DATASET_NAMES", "Dataset", "Split", "analysis_batches", "load_dataset"]
