r"""Certifying that Lanczos missed no eigenvalue: a random-start check on the deflated operator.

A Krylov method finds an eigenvector only through its start vectors'
components along it; a single start vector sees one copy of a repeated
eigenvalue, so a bound on each Ritz value says nothing about the ones it
never saw. After a search has found orthonormal Ritz vectors :math:`X`
(the rows ``L``), the check runs plain Lanczos (no restart, full
reorthogonalization) on the deflated operator :math:`PHP`,
:math:`P = I - XX^\top`, from :math:`v = Pg/\|Pg\|`, :math:`g` Gaussian and
independent of everything before, i.e. uniform on the unit sphere of the
:math:`d = n - |X|` dimensional range of :math:`P`.

The bound (van Dorsselaer, Hochstenbach & van der Vorst 2000, "Computing
probabilistic bounds for extreme eigenvalues of symmetric matrices with the
Lanczos method", SIAM J. Matrix Anal. Appl. 22). After ``q`` steps, the
characteristic polynomial :math:`p` of :math:`T_q` (its roots are the Ritz
values :math:`\theta_i`) satisfies :math:`p(PHP)v = \beta_1\cdots\beta_q
v_{q+1}`. For any eigenpair :math:`(\lambda, u)` of :math:`PHP` on the range
of :math:`P`,

.. math::

    |u^\top v|\,|p(\lambda)| \le \|p(PHP)v\| = \beta_1\cdots\beta_q .

If every Ritz value lies below the threshold :math:`\tau` and
:math:`\lambda \ge \tau`, then :math:`|p(\lambda)| \ge |p(\tau)| =
\prod_i(\tau-\theta_i)` (past its largest root :math:`p` grows), so
:math:`|u^\top v| \le \rho_q = \prod_i \beta_i/(\tau-\theta_i)`. For a fixed
unit :math:`u` and :math:`v` uniform on the sphere of dimension :math:`d \ge 3`,
:math:`P(|u^\top v| \le \rho) \le \rho\sqrt{2d/\pi}` (the density of
:math:`u^\top v` is at most :math:`\sqrt{d/(2\pi)}`; Gautschi's inequality).
The check stops at the first step with :math:`\rho_q\sqrt{2d/\pi} \le
\delta`. Because :math:`|u^\top v| \le \rho_q` holds at *every* step when such a
:math:`\lambda` exists, stopping early does not need a union bound:

    with probability at least :math:`1 - \delta` (over the check's own
    random vector), :math:`PHP` has no eigenvalue :math:`\ge \tau`.

For ``which="smallest"`` the threshold is below (:math:`\lambda \le \tau`,
:math:`p(\tau) = \prod(\theta_i - \tau)`), for ``"magnitude"`` on both sides
(the smaller of the two :math:`|p|`). What this says about :math:`H` itself:
with :math:`R = HX - X\Theta` the residuals of the found pairs, every
eigenvalue of :math:`H` other than the found ones is within :math:`\|R\|_2`
of an eigenvalue of :math:`PHP` (Weyl, on :math:`H` in the basis
:math:`[X, X_\perp]`, whose off-diagonal block is :math:`X_\perp^\top R`).

The bound is worst case over the unseen spectrum and costs no assumption
about it; Hessian spectra (a few outliers far above a bulk near zero) make
:math:`\rho_q` fall by a large factor per step once the Ritz values have
settled on the outliers.

When a Ritz value crosses the threshold instead, the check has found an
eigenvalue the search missed; :func:`flatness.curvature.lanczos_top_eigs`
converges it (a search on the deflated operator), adds it to the found
pairs and checks again with a fresh random vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flatness.curvature.block import BlockState, NonFiniteOperatorError, block_step


class DeflatedOperator:
    """:math:`v \\mapsto PHP v` with :math:`P = I - L^\\top L` for orthonormal rows ``L``; products counted by ``H``."""

    def __init__(self, H: Any, L: Tensor) -> None:
        self.H, self.L = H, L
        self.shape, self.dtype, self.device = H.shape, H.dtype, H.device

    def project(self, Y: Tensor) -> Tensor:
        """``P Y`` (twice, so the result is orthogonal to ``L`` to rounding error)."""
        for _ in range(2):
            Y = Y - self.L.T @ (self.L @ Y)
        return Y

    def __matmul__(self, Y: Tensor) -> Tensor:
        return self.project(self.H @ self.project(Y))


@dataclass
class Check:
    """Result of one check run."""

    certified: bool
    failure_probability: float  # the bound reached (1.0 when nothing was shown)
    hvp_count: int
    outside: Tensor | None  # (n, j) Ritz vectors beyond the threshold, when some were found
    steps: int


def random_check(
    A: Any, L: Tensor, lo: float, hi: float, *, delta: float, budget: int, cap: int, gen: torch.Generator,
) -> Check:  # fmt: skip
    """Lanczos on the deflated operator until :math:`\\rho_q\\sqrt{2d/\\pi} \\le \\delta` or a Ritz value leaves ``(lo, hi)``."""
    D = DeflatedOperator(A, L)
    n, p = int(A.shape[0]), int(L.shape[0])
    d = n - p
    steps = min(budget, cap, d)
    if d <= 0:
        return Check(True, 0.0, 0, None, 0)
    if steps < 1:
        return Check(False, 1.0, 0, None, 0)
    g = D.project(torch.randn(n, 1, generator=gen, dtype=A.dtype, device=A.device))
    state = BlockState(n, steps, 1, A.dtype, A.device, d)
    state.start((g / torch.linalg.vector_norm(g)).T)
    log_factor = 0.5 * math.log(2 * max(d, 3) / math.pi)
    prob = 1.0
    for q in range(1, steps + 1):
        block_step(D, state, 1, gen, D.project)
        Tq = state.T[: q + 1, : q + 1].to("cpu", torch.float64)
        if not bool(torch.isfinite(Tq).all()):
            raise NonFiniteOperatorError("The operator returned non-finite values (NaN or inf) in the verification run")
        theta, S = torch.linalg.eigh(0.5 * (Tq[:q, :q] + Tq[:q, :q].T))
        out = (theta >= hi) | (theta <= lo)
        if bool(out.any()):
            vectors = (S[:, out].to(A.device, A.dtype).T @ state.V[:q]).T
            return Check(False, 1.0, q, vectors, q)
        log_beta = torch.log(torch.diagonal(Tq, -1)[:q].abs()).sum()
        ends = [torch.log(hi - theta).sum()] if math.isfinite(hi) else []
        ends += [torch.log(theta - lo).sum()] if math.isfinite(lo) else []
        log_rho = float(log_beta - min(ends))
        prob = min(1.0, math.exp(min(log_rho + log_factor, 0.0)))
        if prob <= delta or q >= d:  # q = d: the Krylov space is the whole range of P, T is exact
            return Check(True, 0.0 if q >= d else prob, q, None, q)
    return Check(False, prob, steps, None, steps)
