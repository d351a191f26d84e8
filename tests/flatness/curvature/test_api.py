"""Model-level helpers (``flatness.top_eigenvalues`` & co.) on a network with BatchNorm."""

from __future__ import annotations

import pytest
import torch

import flatness
from flatness.curvature import hessian_trace, smallest_eigenvalue, spectral_density, top_eigenvalues
from tests.flatness.curvature.problems import LOSS, problem


def test_lazy_exports() -> None:
    assert flatness.top_eigenvalues is top_eigenvalues
    assert flatness.hessian_trace is hessian_trace
    assert flatness.spectral_density is spectral_density


def test_top_eigenvalues() -> None:
    p = problem("cnn1d_bn")
    r = flatness.top_eigenvalues(p.model, LOSS, p.batches, k=5, tol=1e-8, dtype=torch.float64)
    assert r.converged and r.hvp_count > 0 and r.residuals.shape == (5,)
    assert torch.allclose(r.eigenvalues, p.eigenvalues.flip(0)[:5], rtol=1e-6, atol=0)
    r32 = top_eigenvalues(p.model, LOSS, p.batches, k=2)  # float32 default, tol 1e-6
    assert r32.converged and torch.allclose(r32.eigenvalues, p.eigenvalues.flip(0)[:2], rtol=1e-5, atol=0)


def test_parameter_subset() -> None:
    p = problem("mlp")
    last = [name for name, _ in p.model.named_parameters()][-2:]
    n = sum(q.numel() for k, q in p.model.named_parameters() if k in last)
    block = p.dense[-n:, -n:]
    r = top_eigenvalues(p.model, LOSS, p.batches, k=2, tol=1e-8, params=last, dtype=torch.float64)
    assert torch.allclose(r.eigenvalues, torch.linalg.eigvalsh(block).flip(0)[:2], rtol=1e-6, atol=0)


def test_smallest_eigenvalue() -> None:
    p = problem("cnn1d")
    r = smallest_eigenvalue(p.model, LOSS, p.batches, tol=1e-8, dtype=torch.float64, max_iter=2000)
    assert r.converged and float(r.eigenvalues[0]) == pytest.approx(float(p.eigenvalues[0]), rel=1e-6)


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_hessian_trace(method: str) -> None:
    p = problem("cnn1d_bn")
    r = hessian_trace(p.model, LOSS, p.batches, 300, method=method, dtype=torch.float64)
    assert r.method == method and r.hvp_count == 300
    assert abs(r.trace - float(p.dense.trace())) <= 4 * r.stderr


def test_spectral_density() -> None:
    p = problem("cnn1d")
    r = spectral_density(p.model, LOSS, p.batches, num_steps=30, num_runs=2, num_points=500)
    assert r.hvp_count == 60 and r.grid.shape == r.density.shape == (500,)
    assert float(torch.trapezoid(r.density, r.grid)) == pytest.approx(1.0, abs=2e-3)


def test_unknown_trace_method() -> None:
    p = problem("cnn1d")
    with pytest.raises(ValueError, match="Unknown method 'exact'; expected one of 'hutch\\+\\+', 'hutchinson'"):
        hessian_trace(p.model, LOSS, p.batches, method="exact")


def test_warm_start_and_vectors() -> None:
    """``return_vectors`` gives k flat unit eigenvectors; ``init`` from them converges in a few products."""
    p = problem("mlp")
    r = top_eigenvalues(p.model, LOSS, p.batches, k=2, tol=1e-10, dtype=torch.float64, return_vectors=True)
    assert isinstance(r.eigenvectors, list) and len(r.eigenvectors) == 2
    for value, vec in zip(r.eigenvalues, r.eigenvectors):
        assert vec.shape == (p.dense.shape[0],)
        assert torch.allclose(p.dense @ vec, value * vec, atol=1e-6)
    warm = top_eigenvalues(p.model, LOSS, p.batches, k=2, tol=1e-10, dtype=torch.float64, init=r.eigenvectors)
    assert warm.eigenvectors is None and warm.hvp_count < r.hvp_count
    assert torch.allclose(warm.eigenvalues, r.eigenvalues, rtol=1e-9)
