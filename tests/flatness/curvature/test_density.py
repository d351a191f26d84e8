"""Stochastic Lanczos quadrature: normalisation, moments against the exact trace, known spectra."""

from __future__ import annotations

import math

import pytest
import torch

from flatness.curvature import HessianOperator, broaden, hutchinson_trace, slq_density
from tests.flatness.curvature.problems import LOSS, MODELS, problem


@pytest.mark.parametrize("name", MODELS)
def test_density_integrates_to_one_and_moments_match(name: str) -> None:
    p = problem(name)
    D = p.dense
    n = D.shape[0]
    runs, steps = 4, 40
    r = slq_density(D, steps, runs, seed=3)
    assert r.hvp_count == runs * steps
    assert r.nodes.shape == r.weights.shape == (runs, steps)
    assert torch.allclose(r.weights.sum(dim=1), torch.ones(runs, dtype=torch.float64), atol=1e-12)
    assert float(torch.trapezoid(r.density, r.grid)) == pytest.approx(1.0, abs=1e-3)
    assert torch.all(r.density >= 0)
    # Gauss quadrature is exact for degree <= 2m - 1: with the same probes it reproduces
    # Hutchinson on H and on H^2 to rounding.
    assert r.moment(1) * n == pytest.approx(hutchinson_trace(D, runs, seed=3).trace, rel=1e-10)
    assert r.moment(2) * n == pytest.approx(hutchinson_trace(D @ D, runs, seed=3).trace, rel=1e-10)
    # ... and so estimates tr(H)/n within Hutchinson's error for `runs` probes
    sigma = math.sqrt(2 * float(D.pow(2).sum() - D.diagonal().pow(2).sum()) / runs) / n
    assert abs(r.moment(1) - float(D.trace()) / n) <= 4 * sigma
    # the extreme Ritz values are the extreme eigenvalues
    assert float(r.nodes.max()) == pytest.approx(float(p.eigenvalues[-1]), rel=1e-6)


def test_two_clusters() -> None:
    n = 400
    ev = torch.cat([torch.zeros(n // 2), torch.full((n // 4,), 10.0), torch.linspace(4.0, 6.0, n // 4)]).double()
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    A = (Q * ev) @ Q.T
    r = slq_density(A, 30, 3)
    mass = lambda lo, hi: float(torch.trapezoid(r.density[(r.grid > lo) & (r.grid < hi)], r.grid[(r.grid > lo) & (r.grid < hi)]))  # noqa: E731
    assert mass(-1, 1) == pytest.approx(0.5, abs=0.05)
    assert mass(9, 11) == pytest.approx(0.25, abs=0.05)
    assert mass(3.5, 6.5) == pytest.approx(0.25, abs=0.05)


def test_on_the_hessian_operator() -> None:
    p = problem("cnn1d_bn")
    H = HessianOperator(p.model, LOSS, p.batches, dtype=torch.float64)
    r = slq_density(H, 30, 2, num_points=400)
    assert H.hvp_count == 60 and r.grid.shape == (400,)
    assert float(torch.trapezoid(r.density, r.grid)) == pytest.approx(1.0, abs=2e-3)
    d = r.to_dict()
    assert {"grid", "values", "nodes", "weights", "sigma", "num_runs", "num_steps", "hvp_count"} <= set(d)
    assert len(d["grid"]) == len(d["values"]) == 400


def test_broaden_is_a_gaussian_mixture() -> None:
    nodes = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    weights = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    grid, density, sigma = broaden(nodes, weights, num_points=2001, sigma=0.1)
    g = lambda t, mu: torch.exp(-0.5 * ((t - mu) / 0.1) ** 2) / (0.1 * math.sqrt(2 * math.pi))  # noqa: E731
    assert sigma == 0.1 and grid[0] == pytest.approx(-0.6) and grid[-1] == pytest.approx(2.6)
    assert torch.allclose(density, 0.25 * g(grid, 0.0) + 0.75 * g(grid, 2.0), atol=1e-12)


def test_steps_capped_at_dimension() -> None:
    r = slq_density(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)), 10, 1)
    assert r.nodes.shape == (1, 3) and r.hvp_count == 3
    assert sorted(r.nodes[0].tolist()) == pytest.approx([1.0, 2.0, 3.0])
    assert r.weights[0].tolist() == pytest.approx([1 / 3] * 3)  # Rademacher probe: equal weight on each unit vector


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_steps=0), "Invalid num_steps value: 0"),
        (dict(num_runs=0), "Invalid num_runs value: 0"),
        (dict(num_points=1), "Invalid num_points value: 1"),
        (dict(sigma=-1.0), "Invalid sigma value: -1.0"),
    ],
)
def test_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        slq_density(torch.eye(4, dtype=torch.float64), **kwargs)
