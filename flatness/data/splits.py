"""Which samples a run trains on: the validation hold-out, chosen by seed only.

One function decides it, used by the trainer and by every analysis command,
so a "train" measure is always taken on samples the run actually trained on
(never on held-out ones).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flatness.errors import FlatnessError

SPLITS = ("train", "val", "test")


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from integers (run seed, epoch, batch, ...), stable across versions."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h * 1_000_003 + int(p) + 1) % (2**63 - 1)
    return h


def split_validation(n: int, val_split: int, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(train, val)`` of ``n`` training samples with ``val_split`` held out.

    The held-out samples are the first ``val_split`` of a permutation seeded
    by ``seed`` alone (not by the method), so every method of a study with
    the same seed sees the same validation split. Both index sets are sorted.

    Raises:
        FlatnessError: ``val_split`` leaves no training samples.
    """
    if val_split >= n:
        raise FlatnessError(f"--val-split {val_split} leaves no training samples (the training split has {n}); pass fewer")
    if val_split == 0:
        return torch.arange(n), torch.arange(0)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(seed, -1)))
    return perm[val_split:].sort().values, perm[:val_split].sort().values
