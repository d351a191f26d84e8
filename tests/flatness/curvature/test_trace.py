r"""Hutchinson and Hutch++ against the exact trace, each within a stated matvec budget.

Budgets and bounds:

- Hutchinson, 400 matvecs, on each network Hessian: error within 4 standard
  deviations of the estimator, :math:`4\sqrt{2(\|H\|_F^2 - \sum H_{ii}^2)/400}`,
  and a reported standard error within a factor 2 of that deviation.
- Hutch++, 99 matvecs, on a PSD matrix with eigenvalues :math:`1/i^2` (the
  decaying spectrum of a trained network's Hessian): relative error below
  1 %, where Hutchinson's deviation at the same budget is about 8 %.
- Hutch++, 300 matvecs, on the BatchNorm CNN's Hessian through the HVP
  operator: relative error below 1 %.
"""

from __future__ import annotations

import math

import pytest
import torch

from flatness.curvature import HessianOperator, hutchinson_trace, hutchpp_trace
from tests.flatness.curvature.problems import LOSS, MODELS, problem


def _psd(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = eigenvalues.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return (Q * eigenvalues) @ Q.T


@pytest.mark.parametrize("name", MODELS)
def test_hutchinson_within_budget(name: str) -> None:
    D = problem(name).dense
    m = 400
    sigma = math.sqrt(2 * float(D.pow(2).sum() - D.diagonal().pow(2).sum()) / m)
    r = hutchinson_trace(D, m, seed=0)
    assert r.hvp_count == m and r.method == "hutchinson" and r.samples.shape == (m,)
    assert abs(r.trace - float(D.trace())) <= 4 * sigma
    assert 0.5 * sigma <= r.stderr <= 2 * sigma


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum() -> None:
    ev = 1.0 / torch.arange(1, 501, dtype=torch.float64) ** 2
    A = _psd(ev)
    exact = float(ev.sum())
    pp = hutchpp_trace(A, 99, seed=0)
    assert pp.hvp_count == 99 and pp.method == "hutch++"
    assert abs(pp.trace - exact) / exact < 1e-2
    assert abs(pp.trace - exact) <= 4 * pp.stderr
    sigma = math.sqrt(2 * float(A.pow(2).sum() - A.diagonal().pow(2).sum()) / 99)
    assert sigma / exact > 0.05  # what plain Hutchinson would have to live with


def test_hutchpp_on_the_hessian_operator() -> None:
    p = problem("cnn1d_bn")
    H = HessianOperator(p.model, LOSS, p.batches, dtype=torch.float64)
    r = hutchpp_trace(H, 300, seed=0)
    exact = float(p.dense.trace())
    assert H.hvp_count == 300 == r.hvp_count
    assert abs(r.trace - exact) / abs(exact) < 1e-2


def test_exact_cases() -> None:
    diag = torch.diag(torch.arange(1.0, 41.0, dtype=torch.float64))
    r = hutchinson_trace(diag, 5)
    assert r.trace == pytest.approx(820.0, rel=1e-14) and r.stderr == pytest.approx(0.0, abs=1e-12)
    low_rank = _psd(torch.cat([torch.tensor([3.0, 2.0, 1.0]), torch.zeros(97)]).double())
    r = hutchpp_trace(low_rank, 12)  # sketch of 4 columns spans the rank-3 range
    assert r.trace == pytest.approx(6.0, rel=1e-10) and r.stderr == pytest.approx(0.0, abs=1e-10)


def test_seeds() -> None:
    D = problem("cnn1d").dense
    assert hutchpp_trace(D, 30, seed=1).trace == hutchpp_trace(D, 30, seed=1).trace
    assert hutchpp_trace(D, 30, seed=1).trace != hutchpp_trace(D, 30, seed=2).trace


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda D: hutchinson_trace(D, 1), "Invalid num_matvecs value: 1"),
        (lambda D: hutchpp_trace(D, 3), "Invalid num_matvecs value: 3"),
    ],
)
def test_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(torch.eye(4, dtype=torch.float64))
