"""Thick-restart Lanczos against ``torch.linalg.eigh`` of dense float64 matrices."""

from __future__ import annotations

import re

import pytest
import torch
from torch.overrides import TorchFunctionMode

from flatness.curvature import HessianOperator, lanczos_smallest_eig, lanczos_top_eigs
from flatness.curvature.lanczos import lanczos_steps
from tests.flatness.curvature.problems import LOSS, MODELS, problem


def _spectrum_matrix(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = eigenvalues.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return (Q * eigenvalues) @ Q.T


def _rel_err(found: torch.Tensor, true: torch.Tensor) -> float:
    return float(((found - true).abs() / true.abs()).max())


@pytest.mark.parametrize("name", MODELS)
def test_top5_of_network_hessians(name: str) -> None:
    """Top-5 relative error <= 1e-6 at tol 1e-8, on the HVP operator, against eigh of the dense Hessian."""
    p = problem(name)
    H = HessianOperator(p.model, LOSS, p.batches, dtype=torch.float64)
    r = lanczos_top_eigs(H, k=5, tol=1e-8)
    true = p.eigenvalues.flip(0)[:5]
    assert r.converged
    assert _rel_err(r.eigenvalues, true) <= 1e-6
    assert torch.all(r.eigenvalues[:-1] >= r.eigenvalues[1:])  # descending
    assert r.hvp_count == H.hvp_count
    # the reported residuals are the true ones, and they meet the tolerance
    X = r.eigenvectors
    true_resid = (p.dense @ X - X * r.eigenvalues).norm(dim=0)
    assert torch.allclose(true_resid, r.residuals, rtol=1e-3, atol=1e-12)
    # the stopping rule is on the eigenvalue error bound, and the bound holds
    assert torch.all(r.error_bounds <= 1e-8 * r.eigenvalues.abs())
    assert torch.all((r.eigenvalues - true).abs() <= r.error_bounds + 1e-13)
    assert torch.all(r.error_bounds <= r.residuals)
    assert torch.allclose(X.T @ X, torch.eye(5, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("name", MODELS)
def test_smallest_eigenvalue_of_network_hessians(name: str) -> None:
    p = problem(name)
    H = HessianOperator(p.model, LOSS, p.batches, dtype=torch.float64)
    r = lanczos_smallest_eig(H, tol=1e-8, max_iter=2000)
    assert r.converged and r.which == "smallest"
    assert _rel_err(r.eigenvalues, p.eigenvalues[:1]) <= 1e-6


def test_restarts_on_a_clustered_spectrum() -> None:
    """A small basis forces many thick restarts; the answer stays exact."""
    g = torch.Generator().manual_seed(1)
    ev = torch.cat([torch.tensor([10.0, 9.9, 9.8, 9.0, 8.99, 8.98, 7.0, 6.5]), torch.rand(392, generator=g, dtype=torch.float64) * 5])
    ev = ev.to(torch.float64)
    A = _spectrum_matrix(ev)
    r = lanczos_top_eigs(A, k=6, tol=1e-10, ncv=12, max_iter=3000)
    assert r.converged and r.restarts > 3
    assert _rel_err(r.eigenvalues, ev.sort(descending=True).values[:6]) <= 1e-9


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_which(which: str) -> None:
    ev = torch.cat([torch.linspace(-12, 3, 150, dtype=torch.float64), torch.tensor([8.0, 9.0], dtype=torch.float64)])
    A = _spectrum_matrix(ev, seed=2)
    r = lanczos_top_eigs(A, k=3, tol=1e-10, which=which, max_iter=2000)
    expected = {"largest": [9.0, 8.0, 3.0], "smallest": [-12.0, ev[1].item(), ev[2].item()], "magnitude": [-12.0, ev[1].item(), ev[2].item()]}
    assert r.converged
    assert torch.allclose(r.eigenvalues, torch.tensor(expected[which], dtype=torch.float64), rtol=1e-9)


def test_float32_operator() -> None:
    p = problem("cnn1d_bn")
    H = HessianOperator(p.model, LOSS, p.batches)  # float32
    r = lanczos_top_eigs(H, k=5, tol=1e-5)
    assert r.converged and r.eigenvectors.dtype == torch.float32
    assert _rel_err(r.eigenvalues, p.eigenvalues.flip(0)[:5]) <= 1e-5


def test_budget_exhausted_is_not_converged() -> None:
    p = problem("mlp")
    r = lanczos_top_eigs(p.dense, k=5, tol=1e-12, max_iter=7)
    assert not r.converged and r.hvp_count == 7 and r.eigenvalues.shape == (5,)


def test_invariant_subspaces_and_tiny_matrices() -> None:
    D = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    r = lanczos_top_eigs(D, k=3, tol=1e-10)
    assert r.converged and r.eigenvalues.tolist() == pytest.approx([3.0, 2.0, 1.0], rel=1e-12)
    low_rank = _spectrum_matrix(torch.cat([torch.tensor([5.0, 4.0]), torch.zeros(98)]).double())
    r = lanczos_top_eigs(low_rank, k=4, tol=1e-8)  # Krylov space of dimension 2: breakdown after two steps
    assert r.converged and r.eigenvalues.tolist() == pytest.approx([5.0, 4.0, 0.0, 0.0], abs=1e-9)
    r = lanczos_top_eigs(torch.zeros(30, 30, dtype=torch.float64), k=2)
    assert r.converged and r.eigenvalues.tolist() == [0.0, 0.0] and r.residuals.tolist() == [0.0, 0.0]


def test_deterministic_and_start_vector() -> None:
    A = problem("cnn1d").dense
    a = lanczos_top_eigs(A, k=3, tol=1e-8, seed=5)
    b = lanczos_top_eigs(A, k=3, tol=1e-8, seed=5)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.hvp_count == b.hvp_count
    c = lanczos_top_eigs(A, k=3, tol=1e-8, v0=torch.ones(A.shape[0]))
    assert torch.allclose(c.eigenvalues, a.eigenvalues, rtol=1e-7)


def _repeated_block() -> tuple[torch.Tensor, torch.Tensor]:
    """174 x 174 like a Hessian with 25 unused parameters: 149 distinct eigenvalues in [-1, 2], 25 zero rows."""
    g = torch.Generator().manual_seed(3)
    distinct = torch.rand(149, generator=g, dtype=torch.float64) * 3 - 1
    A = torch.zeros(174, 174, dtype=torch.float64)
    A[:149, :149] = _spectrum_matrix(distinct, seed=4)
    return A, torch.cat([distinct, torch.zeros(25, dtype=torch.float64)])


@pytest.mark.parametrize("k", [149, 160, 173])
def test_breakdown_restarts_find_every_copy_of_a_repeated_eigenvalue(k: int) -> None:
    """After an invariant subspace, a random orthogonal direction continues: all 25 zeros are found.

    Copies come from breakdown continuations in the search or from the check
    (issue 22: it finds the copies the search missed), so their sum is counted.
    """
    A, ev = _repeated_block()
    r = lanczos_top_eigs(A, k=k, tol=1e-10, max_iter=2000)
    true = ev.sort(descending=True).values[:k]
    assert r.converged and r.breakdowns + r.verification["found"] >= 15  # the b start vectors of a block see b copies directly
    assert torch.allclose(r.eigenvalues, true, rtol=0, atol=1e-9)


def test_warm_start_from_eigenvectors() -> None:
    """Vectors of an earlier call (list or matrix) start the basis: the same values in far fewer products."""
    p = problem("mlp")
    cold = lanczos_top_eigs(p.dense, k=3, tol=1e-10)
    near = cold.eigenvectors + 1e-6 * torch.randn(cold.eigenvectors.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    warm = lanczos_top_eigs(p.dense, k=3, tol=1e-10, v0=list(near.T))
    assert warm.converged and torch.allclose(warm.eigenvalues, cold.eigenvalues, rtol=1e-9)
    assert warm.hvp_count < cold.hvp_count
    again = lanczos_top_eigs(p.dense, k=3, tol=1e-10, v0=cold.eigenvectors)
    # issue 22: the check that nothing was missed costs the same cold or warm (here 16 products), so only the search is
    # compared with the 10 products it took before the check existed (block size 2 now: 2 per step, checked every 2 steps)
    search = again.hvp_count - again.verification["hvp_count"]
    assert again.converged and search <= 16 and again.hvp_count < cold.hvp_count
    assert torch.allclose(again.eigenvalues, cold.eigenvalues, rtol=1e-9)
    exact = lanczos_top_eigs(torch.diag(torch.arange(1.0, 31.0, dtype=torch.float64)), k=2, tol=1e-10, v0=torch.eye(30, dtype=torch.float64)[:, -2:], block_size=1)
    assert exact.converged and exact.breakdowns >= 1 and exact.eigenvalues.tolist() == pytest.approx([30.0, 29.0], rel=1e-12)


class _HostSyncs(TorchFunctionMode):
    """Records tensor methods that copy to the host or wait for the device."""

    SYNCS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = getattr(func, "__name__", "")
        if name in self.SYNCS:
            self.seen.add(name)
        if name == "to" and any(isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu" for a in args[1:]):
            self.seen.add("to(cpu)")
        return func(*args, **(kwargs or {}))


def test_lanczos_steps_never_sync_with_the_host() -> None:
    """The per-iteration loop (HVP, reorthogonalization, projection) only launches device work."""
    p = problem("cnn1d_bn")
    H = HessianOperator(p.model, LOSS, p.batches, graph_memory=None)
    n = H.shape[0]
    V = torch.zeros(11, n)
    T = torch.zeros(11, 11)
    V[0] = torch.ones(n) / n**0.5
    H @ V[0]  # build the cached graphs outside the recorded loop
    with _HostSyncs() as rec:
        lanczos_steps(H, V, T, 0, 10)
    assert rec.seen == set()
    assert torch.allclose(V[:11] @ V[:11].T, torch.eye(11), atol=1e-5)


ERRORS = [
    (dict(k=0), "Invalid k value: 0"),
    (dict(k=400), "Invalid k value: 400"),
    (dict(k=5, tol=0.0), "Invalid tol value: 0.0"),
    (dict(k=5, max_iter=0), "Invalid max_iter value: 0"),
    (dict(k=5, ncv=5), "Invalid ncv value: 5"),
    (dict(k=5, ncv=500), "Invalid ncv value: 500"),
    (dict(k=5, which="top"), "Unknown which 'top'; expected one of 'largest', 'smallest', 'magnitude'"),
    (dict(k=5, v0=torch.ones(3)), r"Expected v0 of shape \(338,\) \(or a list of them, or an \(338, m\) matrix\), got \(3,\)"),
    (dict(k=5, check_every=0), "Invalid check_every value: 0"),
    (dict(k=5, block_size=0), "Invalid block_size value: 0"),
    (dict(k=5, failure_probability=0.0), r"Invalid failure_probability value: 0.0 \(expected 0 < p < 1\)"),
    (dict(k=5, failure_probability=1.0), "Invalid failure_probability value: 1.0"),
]


@pytest.mark.parametrize("kwargs, message", ERRORS, ids=[re.sub(r"\W+", "_", m)[:30] for _, m in ERRORS])
def test_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lanczos_top_eigs(problem("cnn1d").dense, **kwargs)


def test_non_finite_operator() -> None:
    A = torch.eye(10, dtype=torch.float64)
    A[3, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite values"):
        lanczos_top_eigs(A, k=2)
