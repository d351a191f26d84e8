"""Invalid hyperparameters: a table of (constructor, kwargs, exception, message regex)."""

from __future__ import annotations

import pytest
import torch

from flatness import optim

SGD = torch.optim.SGD

CASES = [
    (optim.SAM, {"rho": 0.0}, ValueError, r"Invalid rho value: 0\.0"),
    (optim.SAM, {"rho": -0.1}, ValueError, r"Invalid rho value: -0\.1"),
    (optim.SAM, {"rho": float("nan")}, ValueError, r"Invalid rho value: nan"),
    (optim.SAM, {"rho": "0.05"}, TypeError, r"rho must be a real number, got '0\.05'"),
    (optim.ASAM, {"rho": 0.0}, ValueError, r"Invalid rho value: 0\.0"),
    (optim.ASAM, {"adaptive_eta": -1.0}, ValueError, r"Invalid adaptive_eta value: -1\.0"),
    (optim.DeltaSAM, {"rho": -1.0}, ValueError, r"Invalid rho value: -1\.0"),
    (optim.DeltaSAM, {"temperature": 0.0}, ValueError, r"Invalid temperature value: 0\.0"),
    (optim.DeltaSAM, {"num_perturbations": 0}, ValueError, r"Invalid num_perturbations value: 0"),
    (optim.DeltaSAM, {"num_perturbations": 2.5}, TypeError, r"num_perturbations must be an int"),
    (optim.RWP, {"sigma": -0.01}, ValueError, r"Invalid sigma value: -0\.01"),
    (optim.ARWP, {"sigma": -1e-3}, ValueError, r"Invalid sigma value: -0\.001"),
    (optim.ARWP, {"eta": -0.5}, ValueError, r"Invalid eta value: -0\.5"),
    (optim.ARWP, {"beta": 1.0}, ValueError, r"Invalid beta value: 1\.0 \(expected 0 <= beta < 1\)"),
    (optim.ARWP, {"beta": -0.1}, ValueError, r"Invalid beta value: -0\.1"),
    (optim.MRWP, {"lam": 1.5}, ValueError, r"Invalid lam value: 1\.5 \(expected 0 <= lam <= 1\)"),
    (optim.MRWP, {"lam": -0.5}, ValueError, r"Invalid lam value: -0\.5"),
    (
        optim.MRWP,
        {"mix_batches": "interleave"},
        ValueError,
        r"Unknown mix_batches 'interleave'; expected 'same' or 'alternate'",
    ),
    (optim.MARWP, {"sigma": -1.0}, ValueError, r"Invalid sigma value: -1\.0"),
    (optim.MARWP, {"lam": 2.0}, ValueError, r"Invalid lam value: 2\.0"),
    (optim.MARWP, {"eta": -1.0}, ValueError, r"Invalid eta value: -1\.0"),
    (optim.MARWP, {"beta": 1.5}, ValueError, r"Invalid beta value: 1\.5"),
    (optim.MARWP, {"foreach": "yes"}, TypeError, r"foreach must be True, False or None, got 'yes'"),
    (optim.MARWP, {"seed": 1.5}, TypeError, r"seed must be an int or None, got 1\.5"),
    (optim.MARWP, {"model": "net"}, TypeError, r"model must be an nn\.Module or None, got str"),
    (optim.SAM, {"lr": -1.0}, ValueError, r"Invalid learning rate: -1\.0"),  # the base optimizer's own check
]


@pytest.mark.parametrize(("cls", "kwargs", "exc", "pattern"), CASES)
def test_invalid_hyperparameters(cls, kwargs, exc, pattern):
    params = [torch.nn.Parameter(torch.zeros(2))]
    kwargs = {"lr": 0.1, **kwargs}
    with pytest.raises(exc, match=pattern):
        cls(params, SGD, **kwargs)


@pytest.mark.parametrize(
    ("base", "pattern"),
    [
        (
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1),
            r"optimizer class .* not an instance \(SGD object\)",
        ),
        ("sgd", r"base_optimizer must be a torch\.optim\.Optimizer subclass, got 'sgd'"),
    ],
)
def test_invalid_base_optimizer(base, pattern):
    with pytest.raises(TypeError, match=pattern):
        optim.SAM([torch.nn.Parameter(torch.zeros(2))], base, lr=0.1)


def test_boundary_values_are_accepted():
    params = [torch.nn.Parameter(torch.zeros(2))]
    low = optim.MARWP(params, SGD, lr=0.1, sigma=0.0, lam=0.0, eta=0.0, beta=0.0)
    high = optim.MARWP(params, SGD, lr=0.1, lam=1.0, beta=0.999)
    asam = optim.ASAM(params, SGD, lr=0.1, adaptive_eta=0.0)
    group = low.param_groups[0]
    assert (group["sigma"], group["lam"], group["eta"], group["beta"]) == (0.0, 0.0, 0.0, 0.0)
    assert (high.param_groups[0]["lam"], high.param_groups[0]["beta"]) == (1.0, 0.999)
    assert asam.param_groups[0]["adaptive_eta"] == 0.0


def test_split_roles_needs_even_world_size():
    assert optim.split_roles(4) == ([0, 2], [1, 3])
    for size in (1, 3):
        with pytest.raises(ValueError, match=f"even world size >= 2, got {size}"):
            optim.split_roles(size)


def test_parallel_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        optim.ParallelMARWP([torch.nn.Parameter(torch.zeros(2))], SGD, lr=0.1)
