"""Method name -> optimizer, for ``flatness train --method``.

Every optimizer is driven the same way by the loop: once per batch,
``opt.zero_grad(); opt.step(closure)``. The closure runs forward and
backward on the batch and returns the loss; the two-pass methods call it
twice. :class:`MethodSpec` says what the closure must return.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from flatness.errors import FlatnessError
from flatness.training.config import TrainConfig


@dataclass(frozen=True)
class MethodSpec:
    """How to build a method's optimizer and drive its closure.

    Attributes:
        build: ``build(model, config) -> optimizer``.
        per_sample_loss: the closure returns per-sample losses (delta-SAM).
        grad_evals: gradient evaluations per update (for budgets in reports).
        hyper: the config fields the method uses (recorded in reports).
    """

    build: Callable[[nn.Module, TrainConfig], torch.optim.Optimizer]
    per_sample_loss: bool = False
    grad_evals: int = 1
    hyper: tuple[str, ...] = ()


def _sgd(model: nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.nesterov)


def _base_kwargs(c: TrainConfig) -> dict:
    return {"lr": c.lr, "momentum": c.momentum, "weight_decay": c.weight_decay, "nesterov": c.nesterov}


def _method_table() -> dict[str, MethodSpec]:
    table = {"sgd": MethodSpec(_sgd)}
    try:
        from flatness.training.optim_methods import OPTIM_METHODS
    except ImportError:
        return table
    table.update(OPTIM_METHODS)
    return table


def method_names() -> tuple[str, ...]:
    return tuple(_method_table())


def get_method(name: str) -> MethodSpec:
    table = _method_table()
    if name not in table:
        raise FlatnessError(f"unknown method {name!r}; expected one of {', '.join(table)}")
    return table[name]
