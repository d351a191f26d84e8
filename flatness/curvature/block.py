r"""Block thick-restart Lanczos: the search half of :func:`flatness.curvature.lanczos_top_eigs`.

Block Lanczos (Golub & Underwood 1977; Golub & Van Loan, *Matrix
Computations*, 4th ed., section 10.3.6) grows an orthonormal basis
:math:`V` of the block Krylov space :math:`\mathcal K_j(H, V_0) =
\operatorname{span}\{V_0, HV_0, \dots, H^{j-1}V_0\}` of ``b`` start vectors,
``b`` vectors per step. ``b`` start vectors see up to ``b`` copies of a
repeated eigenvalue, where one start vector sees exactly one (its Krylov
space meets each eigenspace in one direction). With full reorthogonalization
the projection :math:`T = V^\top H V` is filled from the coefficients of
the orthogonalization itself, and the state always satisfies

.. math::

    H V_d = V_t\, T_{t,d}, \qquad d = \text{vectors multiplied}, \quad
    t = d + b = \text{vectors in the basis},

so a Ritz pair :math:`(\theta_i, V_d s_i)` of :math:`T_{d,d}` has residual
:math:`\|C s_i\|` with :math:`C = T_{d:t,\,:d}` (the coupling to the ``b``
vectors not yet multiplied), known without another product. The thick
restart (Wu & Simon 2000; block form: Zhou & Saad 2008, "Block Krylov-Schur
method for large symmetric eigenvalue problems", *Numer. Algorithms* 47)
keeps ``keep`` Ritz vectors and the ``b`` unmultiplied vectors;
:math:`T` becomes :math:`\operatorname{diag}(\theta)` bordered by
:math:`C S`.

A step multiplies its ``r <= b`` vectors in ONE call ``H @ X`` (an
``(n, r)`` matrix): :class:`flatness.curvature.HessianOperator` runs the
``r`` products as one batched double backward, which is what makes blocks
cheap on a GPU. The product count still grows by ``r``.

Breakdown without a host round trip: before the QR of the orthogonalized
block, every column gets a random unit vector of norm :math:`4\epsilon
\|Hx_j\|` added (the size of the rounding error of the product itself).
When a column vanished (the basis contains an invariant subspace, e.g. all
the eigenvectors its start vectors can reach), the random part dominates
and the basis continues in a random direction orthogonal to it with
coupling :math:`\approx 4\epsilon\|H\|`; otherwise it changes nothing
measurable. The QR's columns are orthogonalized against the basis once more
and the removed coefficients are added back into :math:`T`, so the relation
above holds to rounding error either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


class NonFiniteOperatorError(ValueError):
    """The operator's products overflowed to NaN or inf (e.g. a Hessian at huge weights in float32)."""


WHICH = ("largest", "smallest", "magnitude")


@dataclass(frozen=True)
class Ritz:
    """Ritz values ordered by ``which``, their vectors in the basis, residual norms and error bounds."""

    theta: Tensor
    S: Tensor
    resid: Tensor
    bounds: Tensor
    coupling: Tensor  # C S: (t - d, d)


@dataclass
class Search:
    """What one block thick-restart run found."""

    theta: Tensor  # (k,) host float64
    vectors: Tensor  # (n, k) on the device
    resid: Tensor
    bounds: Tensor
    residual_vectors: Tensor  # (n, k): H x_i - theta_i x_i, on the device
    converged: bool
    exhausted: bool  # the basis spans the whole space: the values are exact
    hvp_count: int
    restarts: int
    breakdowns: int


class BlockState:
    """Basis rows ``V[:top]`` (``V[:done]`` multiplied), projection ``T``; the block Lanczos relation above."""

    def __init__(self, n: int, capacity: int, b: int, dtype: torch.dtype, device: torch.device, dim: int | None = None) -> None:
        self.n, self.b = n, b
        self.dim = n if dim is None else dim  # dimension of the space the operator acts on (less than n when deflated)
        self.V = torch.zeros(capacity + b, n, dtype=dtype, device=device)
        self.T = torch.zeros(capacity + b, capacity + b, dtype=dtype, device=device)
        self.done, self.top = 0, 0
        self.diag_r: list[tuple[int, int]] = []  # (row, col) of every QR diagonal since the last check

    def start(self, V0: Tensor) -> None:
        """Orthonormal start rows (``b`` of them, already orthonormal)."""
        self.V[: V0.shape[0]] = V0
        self.done, self.top = 0, V0.shape[0]


def block_step(A: Any, state: BlockState, r: int, gen: torch.Generator, project: Any = None) -> None:
    """Multiply rows ``V[done:done+r]`` (one batched call) and append ``r`` new orthonormal rows; no host sync."""
    V, T = state.V, state.T
    d, t, n = state.done, state.top, state.n
    X = V[d : d + r]
    W = (A @ X.T).T  # (r, n)
    scale = torch.linalg.vector_norm(W, dim=1)
    basis = V[:t]
    h = basis @ W.T  # CGS2 against the whole basis
    W = W - h.T @ basis
    h2 = basis @ W.T
    W = W - h2.T @ basis
    h = h + h2
    G = torch.randn(r, n, generator=gen, dtype=V.dtype, device=V.device)
    if project is not None:
        G = project(G.T).T
    G = G / torch.linalg.vector_norm(G, dim=1, keepdim=True).clamp_min(torch.finfo(V.dtype).tiny)
    W = W + (4 * torch.finfo(V.dtype).eps * scale)[:, None] * G
    Q, R = torch.linalg.qr(W.T)  # (n, r), (r, r)
    if project is not None:  # the rounding noise of a vanished column is not in the operator's space; R is tiny then
        Q = project(Q)
    D = basis @ Q  # what the QR of a vanished column let back in; moved into T
    Q = Q - basis.T @ D
    D2 = basis @ Q
    Q = Q - basis.T @ D2
    Q2, R2 = torch.linalg.qr(Q)
    h = h + (D + D2) @ R
    R = R2 @ R
    legit = max(0, min(r, state.dim - t))  # rows past the dimension cannot be orthogonal to the rest: zero, coupling zero
    V[t : t + legit] = Q2.T[:legit]
    V[t + legit : t + r] = 0
    R[legit:] = 0
    T[:t, d : d + r] = h
    T[d : d + r, :t] = h.T
    T[t : t + r, d : d + r] = R
    T[d : d + r, t : t + r] = R.T
    state.diag_r.extend((t + j, d + j) for j in range(legit))
    state.done, state.top = d + r, t + r


def ritz(T: Tensor, done: int, top: int, which: str) -> Ritz:
    """Ritz pairs of ``T[:done, :done]`` (host float64) ordered by ``which``, with residuals ``||C s_i||``."""
    theta, S = torch.linalg.eigh(0.5 * (T[:done, :done] + T[:done, :done].T))
    order = order_by(theta, which)
    theta, S = theta[order], S[:, order]
    CS = T[done:top, :done] @ S
    resid = torch.linalg.vector_norm(CS, dim=0)
    return Ritz(theta, S, resid, error_bounds(theta, resid), CS)


def error_bounds(theta: Tensor, resid: Tensor) -> Tensor:
    r"""Eigenvalue error bounds: :math:`\|R_c\|^2/\delta_c` where the gap is resolved, else :math:`r_i`.

    Values whose intervals :math:`[\theta_i - r_i, \theta_i + r_i]` overlap
    form a cluster :math:`c` (a repeated or nearly repeated eigenvalue);
    :math:`\|R_c\|` is the norm of the cluster's residuals and
    :math:`\delta_c` the distance from the cluster to the nearest value
    outside it, less :math:`\|R_c\|`. For a cluster of one this is
    Kato-Temple's :math:`r_i^2/\delta_i`; for a larger one it is the
    quadratic residual bound of an invariant-subspace approximation
    (Mathias 1998; Li & Li 2005), which does not degrade because the copies
    of a repeated eigenvalue are close to each other. Without a resolved
    gap (or with nothing outside the cluster) the bound is the residual
    (Weyl).
    """
    if theta.numel() < 2:
        return resid.clone()
    order = torch.argsort(theta)
    th, rs = theta[order].tolist(), resid[order].tolist()
    clusters, current = [], [0]
    for i in range(1, len(th)):
        if th[i] - th[i - 1] <= rs[i] + rs[i - 1]:
            current.append(i)
        else:
            clusters.append(current)
            current = [i]
    clusters.append(current)
    out = [0.0] * len(th)
    for c in clusters:
        lo, hi = c[0], c[-1]
        left = th[lo] - th[lo - 1] if lo > 0 else float("inf")
        right = th[hi + 1] - th[hi] if hi + 1 < len(th) else float("inf")
        rc = sum(rs[i] ** 2 for i in c) ** 0.5
        gap = min(left, right) - rc
        for i in c:
            out[i] = rc**2 / gap if rc < gap < float("inf") else rs[i]
    bounds = torch.empty_like(resid)
    bounds[order] = torch.tensor(out, dtype=resid.dtype)
    return bounds


def tolerance(theta: Tensor, tol: float, eps: float) -> Tensor:
    r"""The error each value may have.

    :math:`\max(\mathrm{tol}\cdot\max(|\theta_i|, \epsilon^{2/3}\max_j|\theta_j|),\ 16\epsilon\max_j|\theta_j|)`:
    relative to the value, but never below what rounding leaves
    (:math:`\epsilon` the operator dtype's machine epsilon).
    """
    scale = theta.abs().max().clamp_min(torch.finfo(torch.float64).tiny) if theta.numel() else torch.tensor(1.0, dtype=torch.float64)
    return torch.maximum(tol * torch.maximum(theta.abs(), eps ** (2 / 3) * scale), 16 * eps * scale)


def thick_restart(state: BlockState, rz: Ritz, keep: int) -> None:
    """Keep ``keep`` Ritz vectors and the unmultiplied rows (Wu & Simon 2000; Zhou & Saad 2008)."""
    V, T = state.V, state.T
    d, t = state.done, state.top
    device, dtype = V.device, V.dtype
    Y = rz.S[:, :keep].to(device, dtype)
    V[:keep] = Y.T @ V[:d]
    V[keep : keep + (t - d)] = V[d:t].clone()
    T.zero_()
    T.diagonal()[:keep] = rz.theta[:keep].to(device, dtype)
    C = rz.coupling[:, :keep].to(device, dtype)
    T[keep : keep + (t - d), :keep] = C
    T[:keep, keep : keep + (t - d)] = C.T
    state.done, state.top = keep, keep + (t - d)
    state.diag_r.clear()


def count_breakdowns(state: BlockState, Tj: Tensor, rel: float) -> int:
    """QR diagonals since the last check that vanished (an invariant subspace was found); clears the list."""
    if not state.diag_r:
        return 0
    scale = float(Tj.abs().max())
    rows, cols = zip(*state.diag_r)
    small = int((Tj[list(rows), list(cols)].abs() <= rel * scale).sum())
    state.diag_r.clear()
    return small


def block_search(
    A: Any, k: int, tol: float, budget: int, *, b: int, m: int, keep: int, check: int, which: str, V0: Tensor,
    gen: torch.Generator, project: Any = None, dim: int | None = None,
) -> Search:  # fmt: skip
    """Block thick-restart Lanczos until the ``k`` wanted error bounds meet ``tol`` (or ``budget`` products).

    ``dim``: the dimension of the space the operator acts on (``n``, or less
    for a deflated operator); a basis that large is the whole space.
    """
    n = int(A.shape[0])
    dim = n if dim is None else dim
    keep = min(keep, m - 1)
    state = BlockState(n, m, b, A.dtype, A.device, dim)
    state.start(V0)
    eps = torch.finfo(A.dtype).eps
    count = restarts = breakdowns = 0
    while True:
        goal = min(m, state.done + check * b)
        while state.done < goal and count < budget:
            r = min(b, goal - state.done, budget - count)
            block_step(A, state, r, gen, project)
            count += r
        Tj = state.T[: state.top, : state.top].to("cpu", torch.float64)
        if not bool(torch.isfinite(Tj).all()):
            raise NonFiniteOperatorError(f"The operator returned non-finite values (NaN or inf) within the first {count} products")
        breakdowns += count_breakdowns(state, Tj, 1024 * eps)  # a coupling at rounding level: an invariant subspace
        rz = ritz(Tj, state.done, state.top, which)
        exhausted = state.done >= dim
        limit = tolerance(rz.theta, tol, eps)
        converged = state.done >= k and bool((rz.bounds[:k] <= limit[:k]).all())
        if converged or exhausted or count >= budget:
            break
        if state.done < m:
            continue
        thick_restart(state, rz, keep)
        restarts += 1
    k_out = min(k, state.done)
    S = rz.S[:, :k_out].to(A.device, A.dtype)
    vectors = (S.T @ state.V[: state.done]).T
    resid_vecs = (rz.coupling[:, :k_out].to(A.device, A.dtype).T @ state.V[state.done : state.top]).T
    return Search(
        theta=rz.theta[:k_out].clone(), vectors=vectors, resid=rz.resid[:k_out].clone(), bounds=rz.bounds[:k_out].clone(),
        residual_vectors=resid_vecs, converged=(converged or exhausted) and k_out == k, exhausted=exhausted, hvp_count=count,
        restarts=restarts, breakdowns=breakdowns,
    )  # fmt: skip


def order_by(theta: Tensor, which: str) -> Tensor:
    if which == "largest":
        return torch.argsort(theta, descending=True)
    if which == "smallest":
        return torch.argsort(theta)
    if which == "magnitude":
        return torch.argsort(theta.abs(), descending=True)
    raise ValueError(f"Unknown which {which!r}; expected one of {', '.join(map(repr, WHICH))}")
