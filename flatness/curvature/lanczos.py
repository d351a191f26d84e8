r"""Extreme eigenvalues of a symmetric operator by thick-restart Lanczos, certified.

The Lanczos process (Golub & Van Loan, *Matrix Computations*, 4th ed.,
sections 10.1-10.3) builds an orthonormal basis :math:`V_j` of the Krylov
space :math:`\mathcal K_j(H, v_1) = \operatorname{span}\{v_1, Hv_1, \dots,
H^{j-1}v_1\}` together with the projection :math:`T_j = V_j^\top H V_j`,
so that

.. math::

    H V_j = V_j T_j + \beta_j v_{j+1} e_j^\top .

The eigenpairs :math:`(\theta_i, s_i)` of the small matrix :math:`T_j` give
Ritz pairs :math:`(\theta_i, V_j s_i)` whose residual norm is known without
another product: :math:`\|H V_j s_i - \theta_i V_j s_i\| = |\beta_j|\,|e_j^\top
s_i|`. The extreme eigenvalues converge first, after far fewer products than
power iteration needs (PyHessian, Yao et al. 2020, deflates one eigenvalue at
a time with power iteration).

Here every new vector is orthogonalized against the whole basis, twice
(classical Gram-Schmidt with reorthogonalization, "twice is enough"), which
removes the ghost eigenvalues of the plain three-term recurrence. The
coefficients of that step fill :math:`T_j` directly, so the same loop serves
the thick restart of Wu & Simon (2000) (equivalently Stewart's Krylov-Schur
restart): after ``ncv`` vectors, the ``keep`` best Ritz vectors and the last
residual vector become the start of the next basis, and :math:`T` becomes
:math:`\operatorname{diag}(\theta)` bordered by the couplings
:math:`\beta\, e_j^\top s_i`.

This module holds the single-vector step :func:`lanczos_steps` (used by
stochastic Lanczos quadrature) and :func:`lanczos_top_eigs`, which searches
with the block form of the same process (:mod:`flatness.curvature.block`:
``b`` start vectors see ``b`` copies of a repeated eigenvalue, one sees one)
and then certifies, with a stated failure probability, that no eigenvalue
was missed (:mod:`flatness.curvature.certify`).

Device residency: the basis, the projected matrix and all coefficients stay
on the operator's device; a Lanczos step launches kernels but never waits for
them. Only at a convergence check (every ``check_every`` steps, a few per
restart cycle, and at every restart) is the small ``ncv x ncv`` projected
matrix copied to the host, for a float64 ``eigh`` and the convergence test
(microseconds, against milliseconds for one product).

Why not ``scipy.sparse.linalg.eigsh`` (ARPACK)? Its reverse-communication
loop round-trips every vector through NumPy on the host: one device-to-host
and one host-to-device copy and a synchronisation per product, which idles a
GPU, and it cannot run under ``torch.distributed``. It stays available
through :meth:`HessianOperator.to_scipy` for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from flatness.curvature.block import WHICH, NonFiniteOperatorError, Search, block_search, error_bounds, order_by, tolerance
from flatness.curvature.certify import DeflatedOperator, random_check
from flatness.curvature.operator import as_operator

__all__ = ["EigenResult", "NonFiniteOperatorError", "error_bounds", "lanczos_smallest_eig", "lanczos_steps", "lanczos_top_eigs"]


@dataclass
class EigenResult:
    """Ritz pairs of a symmetric operator.

    Attributes:
        eigenvalues: ``(k,)`` float64 on the host, ordered by ``which``
            (descending for ``"largest"``, ascending for ``"smallest"``,
            descending magnitude for ``"magnitude"``).
        eigenvectors: ``(n, k)`` unit Ritz vectors, on the operator's device
            and in its dtype, column ``i`` for ``eigenvalues[i]``. The
            model-level :func:`flatness.curvature.top_eigenvalues` gives a
            list of ``k`` flat tensors instead (``return_vectors=True``) or
            ``None``.
        residuals: ``(k,)`` float64, :math:`\\|Hx_i - \\theta_i x_i\\|`.
        error_bounds: ``(k,)`` float64 bounds on :math:`|\\lambda - \\theta_i|`
            (:func:`flatness.curvature.block.error_bounds`).
        converged: every error bound met the tolerance AND the check showed
            that no eigenvalue was missed (see :func:`lanczos_top_eigs` for
            exactly what this certifies, and with what probability).
        hvp_count: operator products used, the check's included (a block
            product of ``b`` vectors counts ``b``).
        restarts: thick restarts done.
        which: the part of the spectrum asked for.
        breakdowns: invariant subspaces found (each continued in a random
            direction orthogonal to the basis).
        block_size: vectors per Lanczos step of the search.
        certified_by: ``"random-start check"`` (probabilistic, see
            ``verification``), ``"exhausted"`` (the basis spanned the whole
            space: exact) or ``None`` (not certified).
        verification: what the check did: ``failure_probability`` (the bound
            reached), ``target`` (the one asked for), ``threshold``,
            ``hvp_count`` (its products, within ``hvp_count``), ``runs``,
            ``found`` (eigenpairs it found that the search had missed).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | list[Tensor] | None
    residuals: Tensor
    converged: bool
    hvp_count: int
    restarts: int = 0
    which: str = "largest"
    error_bounds: Tensor | None = None
    breakdowns: int = 0
    block_size: int = 1
    certified_by: str | None = None
    verification: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no vectors)."""
        bounds = self.residuals if self.error_bounds is None else self.error_bounds
        return {
            "eigenvalues": self.eigenvalues.tolist(),
            "residuals": self.residuals.tolist(),
            "error_bounds": bounds.tolist(),
            "converged": self.converged,
            "hvp_count": self.hvp_count,
            "restarts": self.restarts,
            "breakdowns": self.breakdowns,
            "which": self.which,
            "block_size": self.block_size,
            "certified_by": self.certified_by,
            "verification": dict(self.verification),
        }


@dataclass
class _Found:
    """Every eigenpair found so far (search and check), unordered; ``L`` rows orthonormal."""

    theta: Tensor  # host float64
    L: Tensor  # (p, n) on the device
    R: Tensor  # (p, n) residual vectors H x - theta x
    own: Tensor  # error bounds from each pair's own search
    added: int = 0  # pairs added by checks

    def add(self, s: Search) -> None:
        # a pair y found on the deflated operator: H y = PHP y + L^T (R_L y), so its residual gains L^T (R_L y)
        extra = self.L.T @ (self.R @ s.vectors) if self.L.numel() else torch.zeros_like(s.vectors)
        self.theta = torch.cat([self.theta, s.theta])
        self.L = torch.cat([self.L, s.vectors.T])
        self.R = torch.cat([self.R, (s.residual_vectors + extra).T])
        self.own = torch.cat([self.own, s.bounds])
        self.added += int(s.theta.numel())

    def top(self, k: int, which: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The ``k`` wanted values, their vectors ``(n, k)``, residual norms and error bounds."""
        resid = torch.linalg.vector_norm(self.R, dim=1).to("cpu", torch.float64)
        bounds = self.own
        if self.added:  # pairs from different runs: bound them together too (a copy found later joins a cluster)
            bounds = torch.maximum(bounds, error_bounds(self.theta, resid))
        order = order_by(self.theta, which)[:k]
        return self.theta[order], self.L[order.to(self.L.device)].T, resid[order], bounds[order]


def lanczos_top_eigs(
    H: Any,
    k: int = 5,
    tol: float = 1e-6,
    max_iter: int = 500,
    *,
    ncv: int | None = None,
    which: str = "largest",
    v0: Tensor | Sequence[Tensor] | None = None,
    seed: int = 0,
    check_every: int | None = None,
    block_size: int | None = None,
    failure_probability: float = 1e-3,
) -> EigenResult:
    r"""The ``k`` extreme eigenpairs of a symmetric operator, with a check that none was missed.

    Two phases, every product counted in ``hvp_count``:

    1. Search: block thick-restart Lanczos (:mod:`flatness.curvature.block`)
       with ``block_size`` start vectors, until the error bound of each of the
       ``k`` wanted Ritz values meets ``tol``.
    2. Check (:mod:`flatness.curvature.certify`): Lanczos on the operator
       deflated by the found vectors, from a fresh random vector, until it
       shows, with failure probability at most ``failure_probability``, that
       no eigenvalue beyond the ``k``-th found one (by more than its
       tolerance) was missed. If a Ritz value of the check crosses that
       threshold instead, the search missed an eigenvalue (a copy of a
       repeated one, say): it is converged on the deflated operator, added,
       and the check starts again.

    Stopping rule (each value). A Ritz pair :math:`(\theta_i, x_i)` with
    residual :math:`r_i = \|H x_i - \theta_i x_i\|` is within :math:`r_i` of
    an eigenvalue, and within :math:`r_i^2/\delta_i` when no other eigenvalue
    lies within :math:`\delta_i` of :math:`\theta_i` (Kato-Temple; Parlett,
    *The Symmetric Eigenvalue Problem*, ch. 11); a cluster of close Ritz
    values is bounded together (:func:`flatness.curvature.block.error_bounds`).
    A value has converged when its bound :math:`e_i \le \mathrm{tol}\cdot
    \max(|\theta_i|, \epsilon^{2/3}\max_j|\theta_j|)` (:math:`\epsilon` the
    dtype's machine epsilon). Users read eigenvalues, not vectors, so this
    stops once the *eigenvalue* is accurate, about half the products of
    ARPACK's residual test at the same eigenvalue error. The gaps are those
    of the Ritz spectrum, the usual practice of ARPACK-style codes.

    What ``converged`` certifies. With :math:`\theta_k` the ``k``-th value,
    :math:`\tau = \theta_k + \mathrm{tol}\cdot\max(|\theta_k|, \dots)` (for
    ``"largest"``; mirrored for ``"smallest"``, both sides for
    ``"magnitude"``), :math:`X` the found vectors and :math:`R` their
    residuals:

    - each returned value is within its ``error_bounds`` entry (at most
      ``tol`` relative) of an eigenvalue of ``H``;
    - with probability at least ``1 - failure_probability`` over the check's
      random vector, the deflated operator :math:`(I-XX^\top)H(I-XX^\top)` has
      no eigenvalue beyond :math:`\tau`, so no eigenvalue of ``H`` other than
      the found ones exceeds :math:`\tau + \|R\|_2` (Weyl). The bound holds
      whatever the unseen spectrum is (no gap assumption).

    ``certified_by`` says which: ``"random-start check"`` (probability in
    ``verification["failure_probability"]``) or ``"exhausted"`` (the basis
    spanned the whole space; exact). ``converged`` is False when the budget
    ran out first (the best pairs found are returned, ``certified_by`` None).

    Block size. ``b`` start vectors see up to ``b`` copies of a repeated
    eigenvalue per search (one vector sees one); the check catches the rest.
    On a GPU the ``b`` products of a step run as one batched call
    (:meth:`flatness.curvature.HessianOperator.__matmul__` with a matrix).
    Default: 1 for ``k = 1`` (the single-vector path is the cheaper one
    there), else 2 for ``k <= 8`` and 3 above.

    Breakdown. When a new Lanczos vector vanishes, the basis holds an
    invariant subspace; it continues in a random direction orthogonal to it
    (:mod:`flatness.curvature.block`), so copies of repeated eigenvalues are
    found; ``breakdowns`` counts these events.

    Args:
        H: an operator (``shape``, ``dtype``, ``device``, ``@``) or a dense
            symmetric tensor.
        k: number of eigenpairs.
        tol: relative eigenvalue-error tolerance (above). A float32 operator
            cannot reach eigenvalue errors much below :math:`10^{-7}` of
            :math:`\|H\|`; ask for float64 for tighter ``tol``.
        max_iter: most products with ``H``, the check's included.
        ncv: basis size of the search (vectors kept before a restart);
            default ``max(2k + 1, 20)`` rounded up to whole blocks, at most
            ``n``.
        which: ``"largest"`` (algebraic), ``"smallest"`` (algebraic) or
            ``"magnitude"``.
        v0: start vector (default: Gaussian from ``seed``), or several (a
            list of flat tensors or an ``(n, m)`` matrix, e.g. the
            eigenvectors of an earlier call: a warm start), whose sum of unit
            vectors is the first start vector (the others of a block are
            random).
        seed: seed of the start vectors, of the check and of breakdown
            continuations; under ``torch.distributed`` every rank must use
            the same one.
        check_every: Lanczos steps (blocks) between convergence checks of
            the search (each copies the small projected matrix to the host);
            default half a restart cycle. The check phase tests every step.
        block_size: vectors per step of the search (default above).
        failure_probability: the most probability, over the check's random
            vector, that a missed eigenvalue goes unnoticed.

    Returns:
        :class:`EigenResult`.

    Raises:
        ValueError: ``k`` not in ``[1, n]``, ``ncv`` too small, bad ``tol``,
            ``max_iter``, ``which``, ``v0``, ``block_size`` or
            ``failure_probability``; an operator that returns NaN or inf.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> r = lanczos_top_eigs(A, k=3, tol=1e-10)
        >>> [round(x, 6) for x in r.eigenvalues.tolist()], r.converged, r.certified_by
        ([100.0, 99.0, 98.0], True, 'random-start check')
    """
    A = as_operator(H)
    n = int(A.shape[0])
    b, m, keep, check = _check_args(n, k, tol, max_iter, ncv, which, check_every, block_size, failure_probability)
    gen = torch.Generator(device=A.device).manual_seed(seed)
    V0 = _start_block(v0, n, b, A.dtype, A.device, gen)
    s = block_search(A, k, tol, max_iter, b=b, m=m, keep=keep, check=check, which=which, V0=V0, gen=gen)
    found = _Found(s.theta, s.vectors.T, s.residual_vectors.T, s.bounds)
    count, restarts, breakdowns = s.hvp_count, s.restarts, s.breakdowns
    certified_by = "exhausted" if s.exhausted and s.converged else None
    ver: dict[str, Any] = {"failure_probability": 1.0, "target": failure_probability, "threshold": None, "hvp_count": 0, "runs": 0, "found": 0}
    eps = torch.finfo(A.dtype).eps
    while s.converged and certified_by is None:
        theta, _, _, _ = found.top(k, which)
        lo, hi = _thresholds(theta, tol, eps, which)
        ver["threshold"] = hi if which == "largest" else lo if which == "smallest" else [lo, hi]
        c = random_check(A, found.L, lo, hi, delta=failure_probability, budget=max_iter - count, cap=max(2 * m, 60), gen=gen)
        count += c.hvp_count
        ver["hvp_count"] += c.hvp_count
        ver["runs"] += 1
        if c.certified:
            ver["failure_probability"] = c.failure_probability
            certified_by = "random-start check"
            break
        if c.outside is None:  # budget or memory cap ran out before the bound was reached
            ver["failure_probability"] = c.failure_probability
            break
        s = _converge_missed(A, found, c.outside, k, tol, max_iter - count, b, m, keep, check, which, gen)
        count += s.hvp_count
        ver["hvp_count"] += s.hvp_count
        ver["found"] += int(s.theta.numel())
        restarts, breakdowns = restarts + s.restarts, breakdowns + s.breakdowns
        found.add(s)
    theta, X, resid, bounds = found.top(k, which)
    limit = tolerance(theta, tol, eps)
    converged = certified_by is not None and theta.numel() == k and bool((bounds <= limit).all())
    return EigenResult(
        eigenvalues=theta.clone(), eigenvectors=X, residuals=resid, converged=converged, hvp_count=count, restarts=restarts,
        which=which, error_bounds=bounds, breakdowns=breakdowns, block_size=b, certified_by=certified_by, verification=ver,
    )  # fmt: skip


def _converge_missed(
    A: Any, found: _Found, outside: Tensor, k: int, tol: float, budget: int, b: int, m: int, keep: int, check: int, which: str,
    gen: torch.Generator,
) -> Search:  # fmt: skip
    """Converge the pairs a check found beyond the threshold, on the operator deflated by every pair found so far."""
    D = DeflatedOperator(A, found.L)
    d = int(A.shape[0]) - int(found.L.shape[0])
    j = min(int(outside.shape[1]), k, d)
    b = min(b, d)
    rows = outside[:, :b].T
    if rows.shape[0] < b:
        rows = torch.cat([rows, torch.randn(b - rows.shape[0], A.shape[0], generator=gen, dtype=A.dtype, device=A.device)])
    Q, _ = torch.linalg.qr(D.project(rows.T))
    m_d = min(m, d) if min(m, d) > j else d
    keep_d = min(max(j, min(keep, m_d - b)), m_d - 1)
    return block_search(D, j, tol, budget, b=b, m=m_d, keep=keep_d, check=check, which=which, V0=Q.T, gen=gen, project=D.project, dim=d)


def _thresholds(theta: Tensor, tol: float, eps: float, which: str) -> tuple[float, float]:
    """The interval ``(lo, hi)`` a missed eigenvalue would have to leave to change the answer."""
    t_k = float(theta[-1])
    # at least 64 eps ||H||: below that, Ritz values of the deflated operator are rounding noise (e.g. of a zero eigenvalue)
    margin = max(float(tolerance(theta, tol, eps)[-1]), 64 * eps * float(theta.abs().max()))
    if which == "largest":
        return -math.inf, t_k + margin
    if which == "smallest":
        return t_k - margin, math.inf
    edge = abs(t_k) + margin
    return -edge, edge


def _check_args(
    n: int, k: int, tol: float, max_iter: int, ncv: int | None, which: str, check_every: int | None, block_size: int | None,
    failure_probability: float,
) -> tuple[int, int, int, int]:  # fmt: skip
    """Validate; return block size ``b``, basis size ``m``, vectors kept at a restart and blocks between checks."""
    if which not in WHICH:
        raise ValueError(f"Unknown which {which!r}; expected one of {', '.join(map(repr, WHICH))}")
    if not 1 <= k <= n:
        raise ValueError(f"Invalid k value: {k} (expected 1 <= k <= n = {n})")
    if not tol > 0:
        raise ValueError(f"Invalid tol value: {tol} (expected > 0)")
    if max_iter < 1:
        raise ValueError(f"Invalid max_iter value: {max_iter} (expected >= 1)")
    if not 0 < failure_probability < 1:
        raise ValueError(f"Invalid failure_probability value: {failure_probability} (expected 0 < p < 1)")
    b = (1 if k == 1 else 2 if k <= 8 else 3) if block_size is None else block_size
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise ValueError(f"Invalid block_size value: {block_size} (expected a positive integer)")
    b = min(b, n)
    if ncv is None:
        m = min(n, b * -(-max(2 * k + 1, 20) // b))
    else:
        m = int(ncv)
        if m > n or (m <= k and m < n):
            raise ValueError(f"Invalid ncv value: {ncv} (expected k < ncv <= n, with k = {k}, n = {n})")
    # Ritz vectors kept at a restart: the k wanted and as many again as fit,
    # leaving at least one block of new Lanczos steps per cycle.
    keep = max(min(m - b, k + max((m - k) // 2, 1)), min(k, m - 1)) if m > k else k
    check = max(1, (m - keep + b) // (2 * b)) if check_every is None else int(check_every)
    if check < 1:
        raise ValueError(f"Invalid check_every value: {check_every} (expected >= 1)")
    return b, m, keep, check


def _start_block(v0: Tensor | Sequence[Tensor] | None, n: int, b: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Tensor:
    """``(b, n)`` orthonormal start rows: the start vector (random, given, or the sum of given unit vectors), then random ones."""
    first = _start_vector(v0, n, dtype, device, gen)
    if b == 1:
        return first[None]
    rows = torch.cat([first[None], torch.randn(b - 1, n, generator=gen, dtype=dtype, device=device)])
    return torch.linalg.qr(rows.T)[0].T


def _start_vector(v0: Tensor | Sequence[Tensor] | None, n: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Tensor:
    """Unit start vector: random, given, or the sum of given unit vectors (warm start)."""
    if v0 is None:
        v = torch.randn(n, generator=gen, dtype=dtype, device=device)
        return v / torch.linalg.vector_norm(v)
    if isinstance(v0, Tensor) and v0.ndim == 2 and v0.shape[0] == n:
        parts = list(v0.T)
    elif isinstance(v0, Tensor):
        parts = [v0]
    else:
        parts = list(v0)
    if not parts or any(p.shape != (n,) for p in parts):
        shapes = ", ".join(str(tuple(p.shape)) for p in parts) or "nothing"
        raise ValueError(f"Expected v0 of shape ({n},) (or a list of them, or an ({n}, m) matrix), got {shapes}")
    v = sum(p.to(device=device, dtype=dtype) / torch.linalg.vector_norm(p.to(dtype)).clamp_min(torch.finfo(dtype).tiny) for p in parts)
    norm = torch.linalg.vector_norm(v)
    if not bool(norm > 0) or not bool(torch.isfinite(norm)):
        raise ValueError("Expected a nonzero, finite v0")
    return v / norm


def lanczos_smallest_eig(H: Any, tol: float = 1e-6, max_iter: int = 500, **kwargs: Any) -> EigenResult:
    """The smallest (most negative) eigenpair; :func:`lanczos_top_eigs` with ``which="smallest"``.

    The Krylov space of :math:`H` equals that of :math:`\\sigma I - H`, so no
    shift is needed. Near a minimum the bottom of a Hessian's spectrum is
    crowded around zero, so this usually takes more products than the top.
    """
    return lanczos_top_eigs(H, 1, tol, max_iter, which="smallest", **kwargs)


def lanczos_steps(A: Any, V: Tensor, T: Tensor, start: int, stop: int) -> None:
    r"""Lanczos steps ``start .. stop-1`` with full reorthogonalization, in place.

    On entry rows ``V[:start+1]`` are orthonormal and ``T[:start, :start+1]``
    holds their projection; on exit ``V[:stop+1]`` and ``T[:stop+1, :stop]``
    do. Step :math:`j` computes :math:`w = Hv_j`, removes its components
    along :math:`v_0..v_j` twice (CGS2), and stores the removed coefficients
    as column/row :math:`j` of :math:`T` and :math:`\beta_j = \|w\|` below
    the diagonal. No host synchronisation.

    If :math:`w` vanishes (an invariant subspace was found), the rounding
    noise left in it continues the basis for the rest of the chunk; the
    caller (:func:`lanczos_top_eigs`) detects the tiny coupling at its next
    check and replaces that vector with a fresh random one orthogonal to the
    basis. An exactly zero :math:`w` gives a zero row, never NaN.
    """
    tiny = torch.finfo(V.dtype).tiny
    for j in range(start, stop):
        w = A @ V[j]
        basis = V[: j + 1]
        h = basis @ w
        w = torch.addmv(w, basis.T, h, alpha=-1.0)
        h2 = basis @ w
        w = torch.addmv(w, basis.T, h2, alpha=-1.0)
        h = h + h2
        beta = torch.linalg.vector_norm(w)
        V[j + 1] = w / beta.clamp_min(tiny)
        T[: j + 1, j] = h
        T[j, : j + 1] = h
        T[j + 1, j] = beta
        T[j, j + 1] = beta
