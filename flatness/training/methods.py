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
        per_rank_first_pass: data-parallel runs take the first pass's gradient
            per rank, without averaging (SAM family; see :mod:`flatness.training.parallel`).
    """

    build: Callable[[nn.Module, TrainConfig], torch.optim.Optimizer]
    per_sample_loss: bool = False
    grad_evals: int = 1
    hyper: tuple[str, ...] = ()
    per_rank_first_pass: bool = False


def _sgd(model: nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.nesterov)


def _method_table() -> dict[str, MethodSpec]:
    from flatness.training.optim_methods import OPTIM_METHODS

    return {"sgd": MethodSpec(_sgd), **OPTIM_METHODS}


def method_names() -> tuple[str, ...]:
    return tuple(_method_table())


def get_method(name: str) -> MethodSpec:
    table = _method_table()
    if name not in table:
        raise FlatnessError(f"unknown method {name!r}; expected one of {', '.join(table)}")
    return table[name]


def check_method(config: TrainConfig) -> MethodSpec:
    """Validate the method and its hyperparameters before any data is loaded.

    Builds the optimizer over a one-parameter stand-in model, so every
    hyperparameter check of :mod:`flatness.optim` runs (and fails as a one-line
    FlatnessError) up front.
    """
    import dataclasses

    spec = get_method(config.method)
    probe = dataclasses.replace(config, parallel_roles=False)
    if config.parallel_roles and config.method not in ("m-rwp", "m-arwp"):
        raise FlatnessError(f"--parallel-roles is for m-rwp and m-arwp, not {config.method!r}")
    spec.build(nn.Linear(1, 1), probe)
    for flag, used in (("sigma-inc", config.sigma_inc != 0.0), ("incstd", config.incstd)):
        if used and "sigma_inc" not in spec.hyper:
            raise FlatnessError(f"--{flag} is for the RWP family, not {config.method!r}")
    return spec


def grad_evals_per_batch(config: TrainConfig) -> int:
    """Forward-backward passes per batch (``alternate`` mixing and parallel roles: 1)."""
    spec = get_method(config.method)
    if config.method in ("m-rwp", "m-arwp") and (config.mix_batches == "alternate" or config.parallel_roles):
        return 1
    return spec.grad_evals
