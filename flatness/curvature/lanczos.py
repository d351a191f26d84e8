r"""Extreme eigenvalues of a symmetric operator by thick-restart Lanczos.

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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flatness.curvature.operator import as_operator

WHICH = ("largest", "smallest", "magnitude")


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
        error_bounds: ``(k,)`` float64 bounds on :math:`|\\lambda - \\theta_i|`:
            :math:`\\|r_i\\|^2/\\delta_i` where the gap :math:`\\delta_i` to the
            rest of the Ritz spectrum is resolved, else :math:`\\|r_i\\|`.
        converged: every error bound met the tolerance (see
            :func:`lanczos_top_eigs` for what this certifies).
        hvp_count: operator products used.
        restarts: thick restarts done.
        which: the part of the spectrum asked for.
        breakdowns: invariant subspaces found (each continued with a fresh
            random vector orthogonal to the basis).
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
        }


@dataclass(frozen=True)
class _Ritz:
    """Ritz values (ordered by ``which``), their vectors in the basis, residuals and error bounds."""

    theta: Tensor
    S: Tensor
    resid: Tensor
    bounds: Tensor
    beta: Tensor


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
) -> EigenResult:
    r"""The ``k`` extreme eigenpairs of a symmetric operator (thick-restart Lanczos).

    Stopping rule. A Ritz pair :math:`(\theta_i, x_i)` with residual
    :math:`r_i = \|H x_i - \theta_i x_i\|` is within :math:`r_i` of an
    eigenvalue, and within :math:`r_i^2/\delta_i` when no other eigenvalue
    lies within :math:`\delta_i` of :math:`\theta_i` (Kato-Temple; Parlett,
    *The Symmetric Eigenvalue Problem*, ch. 11). With :math:`\delta_i =
    \min_{j\ne i}|\theta_i-\theta_j| - r_i` (the gap to the rest of the
    Ritz spectrum, shrunk by the residual) the error bound is

    .. math::

        e_i = \begin{cases} r_i^2/\delta_i & \delta_i > r_i \\ r_i &
        \text{otherwise (gap not resolved)} \end{cases}

    and the pair is converged when :math:`e_i \le \mathrm{tol}\cdot
    \max(|\theta_i|, \epsilon^{2/3}\max_j|\theta_j|)` (:math:`\epsilon` the
    dtype's machine epsilon). Users read eigenvalues, not vectors, so this
    stops once the *eigenvalue* is accurate, which takes about half the
    products of ARPACK's residual test at the same eigenvalue error. The
    residuals stay in the result. The Ritz gap can overestimate the true gap
    while a neighbouring eigenvalue is not yet found; that is the usual
    practice of ARPACK-style codes and holds well on Hessian spectra, whose
    top is made of separated outliers.

    Breakdown. When the new Lanczos vector vanishes (coupling
    :math:`\beta_j \le 16\,\epsilon\,\|T\|`, far below any coupling that
    carries information; the rounding noise of an exact breakdown is about
    :math:`0.1\,\epsilon\,\|T\|`), the basis spans an
    invariant subspace: its Ritz values are exact eigenvalues, but a start
    vector sees only one copy of a repeated eigenvalue. The basis then
    continues from a fresh random vector orthogonal to it (coupling 0), and
    convergence is not tested at a breakdown, so copies of repeated
    eigenvalues are found (an exactly repeated eigenvalue of multiplicity
    :math:`m` costs :math:`m` breakdowns).

    What ``converged`` certifies: every one of the ``k`` returned values is
    within its ``error_bounds`` entry (at most ``tol`` relative) of an
    eigenvalue of ``H``, and the current Krylov block is not invariant. It
    does not prove that no larger eigenvalue was missed: like every Krylov
    method, Lanczos finds an eigenvector only through the start vector's
    component along it (nonzero with probability one for the random start).
    ``converged`` is also True when the basis spans the whole space.

    Args:
        H: an operator (``shape``, ``dtype``, ``device``, ``@``) or a dense
            symmetric tensor.
        k: number of eigenpairs.
        tol: relative eigenvalue-error tolerance (above). A float32 operator
            cannot reach eigenvalue errors much below :math:`10^{-7}` of
            :math:`\|H\|`; ask for float64 for tighter ``tol``.
        max_iter: most Lanczos steps, i.e. products with ``H``.
        ncv: basis size (Lanczos vectors kept before a restart); default
            ``max(2k + 1, 20)``, at most ``n``.
        which: ``"largest"`` (algebraic), ``"smallest"`` (algebraic) or
            ``"magnitude"``.
        v0: start vector (default: Gaussian from ``seed``), or several (a
            list of flat tensors or an ``(n, m)`` matrix, e.g. the
            eigenvectors of an earlier call: a warm start), whose sum of unit
            vectors starts the basis.
        seed: seed of the start vector and of restarts after a breakdown;
            under ``torch.distributed`` every rank must use the same one.
        check_every: Lanczos steps between convergence checks (each copies
            the small projected matrix to the host and solves it there);
            default half the steps of a restart cycle. A restart is always
            a check.

    Returns:
        :class:`EigenResult`; ``converged`` is False when ``max_iter`` ran
        out first (the best Ritz pairs found are returned).

    Raises:
        ValueError: ``k`` not in ``[1, n]``, ``ncv`` too small, bad ``tol``,
            ``max_iter``, ``which`` or ``v0``; an operator that returns NaN
            or inf.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> r = lanczos_top_eigs(A, k=3, tol=1e-10)
        >>> [round(x, 6) for x in r.eigenvalues.tolist()]
        [100.0, 99.0, 98.0]
    """
    A = as_operator(H)
    n = int(A.shape[0])
    m, keep, check = _check_args(n, k, tol, max_iter, ncv, which, check_every)
    dtype, device = A.dtype, A.device
    gen = torch.Generator(device=device).manual_seed(seed)
    V = torch.zeros(m + 1, n, dtype=dtype, device=device)  # rows are basis vectors
    T = torch.zeros(m + 1, m + 1, dtype=dtype, device=device)
    V[0] = _start_vector(v0, n, dtype, device, gen)
    eps = torch.finfo(dtype).eps

    stop, count, restarts, breakdowns, step = 0, 0, 0, 0, check
    while True:
        start, stop = stop, min(m, stop + step, stop + (max_iter - count))
        lanczos_steps(A, V, T, start, stop)
        count += stop - start
        # --- convergence check: the one host round trip, every `check` steps ---
        Tj = T[: stop + 1, : stop + 1].to("cpu", torch.float64)
        if not bool(torch.isfinite(Tj).all()):
            raise ValueError(f"The operator returned non-finite values (NaN or inf) within the first {count} products")
        broken = _first_breakdown(Tj, start, stop, 16 * eps)
        if broken is not None and broken + 1 < n:
            stop, step = broken + 1, 1  # drop the steps after it; probe the new block one step at a time
            _restart_orthogonal(V, T, stop, gen)
            breakdowns += 1
            if count >= max_iter:
                ritz = _ritz(T[: stop + 1, : stop + 1].to("cpu", torch.float64), stop, which)
                converged = False
                break
            continue
        step = check
        ritz = _ritz(Tj, stop, which)
        scale = ritz.theta.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        limit = tol * torch.maximum(ritz.theta.abs(), eps ** (2 / 3) * scale)
        converged = stop >= k and bool((ritz.bounds[:k] <= limit[:k]).all())
        exhausted = stop == n  # the Krylov space is the whole space: T is exact
        converged = converged or (exhausted and stop >= k)
        if converged or exhausted or count >= max_iter:
            break
        if stop < m:
            continue
        _thick_restart(V, T, ritz, keep, stop)
        stop = keep
        restarts += 1

    k_out = min(k, stop)
    vectors = (ritz.S[:, :k_out].to(device, dtype).T @ V[:stop]).T
    return EigenResult(
        eigenvalues=ritz.theta[:k_out].clone(),
        eigenvectors=vectors,
        residuals=ritz.resid[:k_out].clone(),
        converged=converged and k_out == k,
        hvp_count=count,
        restarts=restarts,
        which=which,
        error_bounds=ritz.bounds[:k_out].clone(),
        breakdowns=breakdowns,
    )


def _check_args(n: int, k: int, tol: float, max_iter: int, ncv: int | None, which: str, check_every: int | None) -> tuple[int, int, int]:
    """Validate; return basis size ``m``, vectors kept at a restart and steps between checks."""
    if which not in WHICH:
        raise ValueError(f"Unknown which {which!r}; expected one of {', '.join(map(repr, WHICH))}")
    if not 1 <= k <= n:
        raise ValueError(f"Invalid k value: {k} (expected 1 <= k <= n = {n})")
    if not tol > 0:
        raise ValueError(f"Invalid tol value: {tol} (expected > 0)")
    if max_iter < 1:
        raise ValueError(f"Invalid max_iter value: {max_iter} (expected >= 1)")
    m = min(n, max(2 * k + 1, 20)) if ncv is None else int(ncv)
    if m > n or (m <= k and m < n):
        raise ValueError(f"Invalid ncv value: {ncv} (expected k < ncv <= n, with k = {k}, n = {n})")
    # Ritz vectors kept at a restart: the k wanted and as many again as fit,
    # leaving at least a few new Lanczos steps per cycle.
    keep = min(m - 1, k + max((m - k) // 2, 1)) if m > k else k
    check = max(1, (m - keep + 1) // 2) if check_every is None else int(check_every)
    if check < 1:
        raise ValueError(f"Invalid check_every value: {check_every} (expected >= 1)")
    return m, keep, check


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


def _ritz(Tj: Tensor, stop: int, which: str) -> _Ritz:
    """Ritz values of the ``stop x stop`` projection (float64, host), residuals and error bounds."""
    theta, S = torch.linalg.eigh(_symmetric(Tj[:stop, :stop]))
    beta = Tj[stop, stop - 1]
    order = _order(theta, which)
    theta, S = theta[order], S[:, order]
    resid = (beta * S[stop - 1, :]).abs()
    return _Ritz(theta, S, resid, error_bounds(theta, resid), beta)


def error_bounds(theta: Tensor, resid: Tensor) -> Tensor:
    r"""Eigenvalue error bounds :math:`r_i^2/\delta_i` (gap resolved) or :math:`r_i`.

    :math:`\delta_i = \min_{j \ne i} |\theta_i - \theta_j| - r_i`; a lone
    Ritz value has an infinite gap (bound 0 when the residual is 0).
    """
    if theta.numel() < 2:
        return resid.clone()
    dist = (theta[:, None] - theta[None, :]).abs()
    dist.fill_diagonal_(float("inf"))
    delta = dist.min(dim=1).values - resid
    quad = resid**2 / delta.clamp_min(torch.finfo(theta.dtype).tiny)
    return torch.where(delta > resid, quad, resid)


def _first_breakdown(Tj: Tensor, start: int, stop: int, rel: float) -> int | None:
    """First step ``j`` in ``[start, stop)`` whose coupling ``beta_j`` vanished (invariant subspace)."""
    scale = float(Tj.abs().max())
    betas = torch.diagonal(Tj, -1)[start:stop]
    small = (betas <= rel * scale).nonzero()
    return None if small.numel() == 0 else start + int(small[0, 0])


def _restart_orthogonal(V: Tensor, T: Tensor, stop: int, gen: torch.Generator) -> None:
    """After a breakdown at step ``stop - 1``: a random unit ``V[stop]`` orthogonal to ``V[:stop]``, coupling 0."""
    basis = V[:stop]
    w = torch.randn(V.shape[1], generator=gen, dtype=V.dtype, device=V.device)
    for _ in range(2):  # CGS2
        w = torch.addmv(w, basis.T, basis @ w, alpha=-1.0)
    V[stop] = w / torch.linalg.vector_norm(w)
    T[stop:, :] = 0
    T[:, stop:] = 0


def _thick_restart(V: Tensor, T: Tensor, ritz: _Ritz, keep: int, stop: int) -> None:
    """Keep the best ``keep`` Ritz vectors and the residual vector (Wu & Simon 2000)."""
    device, dtype = V.device, V.dtype
    Y = ritz.S[:, :keep].to(device, dtype)
    V[:keep] = Y.T @ V[:stop]
    V[keep] = V[stop]
    T.zero_()
    T.diagonal()[:keep] = ritz.theta[:keep].to(device, dtype)
    coupling = (ritz.beta * ritz.S[stop - 1, :keep]).to(device, dtype)
    T[keep, :keep] = coupling
    T[:keep, keep] = coupling


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


def _symmetric(T: Tensor) -> Tensor:
    return 0.5 * (T + T.T)


def _order(theta: Tensor, which: str) -> Tensor:
    if which == "largest":
        return torch.argsort(theta, descending=True)
    if which == "smallest":
        return torch.argsort(theta)
    if which == "magnitude":
        return torch.argsort(theta.abs(), descending=True)
    raise ValueError(f"Unknown which {which!r}; expected one of {', '.join(map(repr, WHICH))}")
