"""The :mod:`flatness.optim` methods as entries of the trainer's method table.

Every optimizer wraps ``torch.optim.SGD`` with the run's ``lr``, ``momentum``,
``weight_decay`` and ``nesterov``; its noise generators are seeded from the
run seed, and it gets ``model=`` so perturbed passes leave BatchNorm running
statistics alone. With ``--parallel-roles`` (under torchrun) m-RWP / m-ARWP
become the two-role :class:`flatness.optim.ParallelMRWP` / :class:`flatness.optim.ParallelMARWP`.
"""

from __future__ import annotations

import torch
from torch import nn

from flatness import optim
from flatness.errors import FlatnessError
from flatness.training.config import TrainConfig
from flatness.training.methods import MethodSpec


def _common(model: nn.Module, c: TrainConfig) -> dict:
    return {
        "lr": c.lr,
        "momentum": c.momentum,
        "weight_decay": c.weight_decay,
        "nesterov": c.nesterov,
        "model": model,
        "seed": c.seed,
    }


def _checked(build):  # noqa: ANN001, ANN202 - decorator over builders
    """Turn the optimizers' ValueError for a bad hyperparameter into a one-line user error."""

    def wrapped(model: nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
        try:
            return build(model, c)
        except ValueError as e:
            raise FlatnessError(f"--method {c.method}: {e}") from None

    return wrapped


@_checked
def _sam(model: nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
    return optim.SAM(model.parameters(), torch.optim.SGD, rho=c.rho, **_common(model, c))


@_checked
def _asam(model: nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
    # The official code's grouping (SamsungLabs/ASAM: ``if 'weight' in n``): weights of every layer,
    # normalisation weights included, get T_w = |w| + eta; biases are perturbed without it.
    groups = optim.asam_param_groups(model, rule="name")
    return optim.ASAM(groups, torch.optim.SGD, rho=c.rho, adaptive_eta=c.adaptive_eta, **_common(model, c))


@_checked
def _delta_sam(model: nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
    return optim.DeltaSAM(model.parameters(), torch.optim.SGD, rho=c.rho, temperature=c.temperature, **_common(model, c))


@_checked
def _rwp(model: nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
    return optim.RWP(model.parameters(), torch.optim.SGD, sigma=c.sigma, **_common(model, c))


@_checked
def _arwp(model: nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
    return optim.ARWP(model.parameters(), torch.optim.SGD, sigma=c.sigma, eta=c.eta, beta=c.beta, **_common(model, c))


@_checked
def _mrwp(model: nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
    if c.parallel_roles:
        return optim.ParallelMRWP(model.parameters(), torch.optim.SGD, sigma=c.sigma, lam=c.lam, **_common(model, c))
    return optim.MRWP(model.parameters(), torch.optim.SGD, sigma=c.sigma, lam=c.lam, mix_batches=c.mix_batches, **_common(model, c))


@_checked
def _marwp(model: nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
    if c.parallel_roles:
        return optim.ParallelMARWP(
            model.parameters(), torch.optim.SGD, sigma=c.sigma, lam=c.lam, eta=c.eta, beta=c.beta, **_common(model, c)
        )
    return optim.MARWP(
        model.parameters(), torch.optim.SGD, sigma=c.sigma, lam=c.lam, eta=c.eta, beta=c.beta, mix_batches=c.mix_batches,
        **_common(model, c),
    )


OPTIM_METHODS: dict[str, MethodSpec] = {
    "sam": MethodSpec(_sam, grad_evals=2, hyper=("rho",), per_rank_first_pass=True),
    "asam": MethodSpec(_asam, grad_evals=2, hyper=("rho", "adaptive_eta"), per_rank_first_pass=True),
    "delta-sam": MethodSpec(_delta_sam, per_sample_loss=True, grad_evals=2, hyper=("rho", "temperature")),
    "rwp": MethodSpec(_rwp, grad_evals=1, hyper=("sigma", "sigma_inc")),
    "arwp": MethodSpec(_arwp, grad_evals=1, hyper=("sigma", "sigma_inc", "eta", "beta")),
    "m-rwp": MethodSpec(_mrwp, grad_evals=2, hyper=("sigma", "sigma_inc", "lam", "mix_batches")),
    "m-arwp": MethodSpec(_marwp, grad_evals=2, hyper=("sigma", "sigma_inc", "lam", "eta", "beta", "mix_batches")),
}
