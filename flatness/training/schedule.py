"""Learning-rate schedules, stepped once per parameter update: cosine, step, constant."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from flatness.errors import FlatnessError
from flatness.training.config import TrainConfig


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, batches_per_epoch: int) -> LambdaLR:
    r"""A per-update ``LambdaLR`` (the trainer steps it when the optimizer updated).

    - ``cosine``: :math:`\eta_t = \eta_0 \tfrac12 (1 + \cos(\pi t / T))`, ``T`` = all updates (``epochs * batches_per_epoch``).
    - ``step``: multiplied by ``gamma`` at each milestone (fractions of the epochs).
    - ``constant``: :math:`\eta_t = \eta_0`.
    """
    total = config.epochs * batches_per_epoch
    if config.schedule == "cosine":

        def factor(t: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))

    elif config.schedule == "step":
        bounds = [round(m * config.epochs) * batches_per_epoch for m in config.milestones]

        def factor(t: int) -> float:
            return config.gamma ** sum(t >= b for b in bounds)

    elif config.schedule == "constant":

        def factor(t: int) -> float:
            return 1.0

    else:
        raise FlatnessError(f"unknown schedule {config.schedule!r}; expected 'cosine', 'step' or 'constant'")
    return LambdaLR(optimizer, factor)
