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
            and in its dtype, column ``i`` for ``eigenvalues[i]``.
        residuals: ``(k,)`` float64, :math:`\\|Hx_i - \\theta_i x_i\\|`.
        converged: every residual met the tolerance.
        hvp_count: operator products used.
        restarts: thick restarts done.
        which: the part of the spectrum asked for.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: bool
    hvp_count: int
    restarts: int = 0
    which: str = "largest"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no vectors)."""
        return {
            "eigenvalues": self.eigenvalues.tolist(),
            "residuals": self.residuals.tolist(),
            "converged": self.converged,
            "hvp_count": self.hvp_count,
            "restarts": self.restarts,
            "which": self.which,
        }


def lanczos_top_eigs(
    H: Any,
    k: int = 5,
    tol: float = 1e-6,
    max_iter: int = 500,
    *,
    ncv: int | None = None,
    which: str = "largest",
    v0: Tensor | None = None,
    seed: int = 0,
    check_every: int | None = None,
) -> EigenResult:
    r"""The ``k`` extreme eigenpairs of a symmetric operator (thick-restart Lanczos).

    Ritz pair :math:`(\theta_i, x_i)` is converged when

    .. math::

        \|H x_i - \theta_i x_i\| \le \mathrm{tol} \cdot
        \max\bigl(|\theta_i|,\ \epsilon^{2/3} \max_j |\theta_j|\bigr),

    the ARPACK test made scale-free (:math:`\epsilon` the dtype's machine
    epsilon). Then :math:`|\lambda - \theta_i| \le \|H x_i - \theta_i x_i\|`
    for some eigenvalue :math:`\lambda`, and usually far less
    (:math:`\|r\|^2/\mathrm{gap}`). A float32 operator cannot reach residuals
    much below :math:`10^{-6}` of :math:`\|H\|`; ask for float64 for tighter
    ``tol``.

    Args:
        H: an operator (``shape``, ``dtype``, ``device``, ``@``) or a dense
            symmetric tensor.
        k: number of eigenpairs.
        tol: relative residual tolerance (above).
        max_iter: most Lanczos steps, i.e. products with ``H``.
        ncv: basis size (Lanczos vectors kept before a restart); default
            ``max(2k + 1, 20)``, at most ``n``.
        which: ``"largest"`` (algebraic), ``"smallest"`` (algebraic) or
            ``"magnitude"``.
        v0: start vector (default: Gaussian from ``seed``).
        seed: seed of the start vector; under ``torch.distributed`` every
            rank must use the same one.
        check_every: Lanczos steps between convergence checks (each copies
            the small projected matrix to the host and solves it there);
            default half the steps of a restart cycle. A restart is always
            a check.

    Returns:
        :class:`EigenResult`; ``converged`` is False when ``max_iter`` ran
        out first (the best Ritz pairs found are returned).

    Raises:
        ValueError: ``k`` not in ``[1, n]``, ``ncv`` too small, bad ``tol``,
            ``max_iter`` or ``which``; an operator that returns NaN or inf.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> r = lanczos_top_eigs(A, k=3, tol=1e-10)
        >>> [round(x, 6) for x in r.eigenvalues.tolist()]
        [100.0, 99.0, 98.0]
    """
    A = as_operator(H)
    n = int(A.shape[0])
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

    dtype, device = A.dtype, A.device
    V = torch.zeros(m + 1, n, dtype=dtype, device=device)  # rows are basis vectors
    T = torch.zeros(m + 1, m + 1, dtype=dtype, device=device)
    if v0 is None:
        gen = torch.Generator(device=device).manual_seed(seed)
        v0 = torch.randn(n, generator=gen, dtype=dtype, device=device)
    else:
        if v0.shape != (n,):
            raise ValueError(f"Expected v0 of shape ({n},), got {tuple(v0.shape)}")
        v0 = v0.to(device=device, dtype=dtype)
    V[0] = v0 / torch.linalg.vector_norm(v0)
    eps = torch.finfo(dtype).eps

    check = max(1, (m - keep + 1) // 2) if check_every is None else int(check_every)
    if check < 1:
        raise ValueError(f"Invalid check_every value: {check_every} (expected >= 1)")
    stop, count, restarts = 0, 0, 0
    while True:
        start, stop = stop, min(m, stop + check, stop + (max_iter - count))
        lanczos_steps(A, V, T, start, stop)
        count += stop - start
        # --- convergence check: the one host round trip, every `check` steps ---
        Tj = T[: stop + 1, : stop + 1].to("cpu", torch.float64)
        if not bool(torch.isfinite(Tj).all()):
            raise ValueError(f"The operator returned non-finite values (NaN or inf) within the first {count} products")
        theta, S = torch.linalg.eigh(_symmetric(Tj[:stop, :stop]))
        beta = Tj[stop, stop - 1]
        order = _order(theta, which)
        theta, S = theta[order], S[:, order]
        resid = (beta * S[stop - 1, :]).abs()
        scale = theta.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        bound = tol * torch.maximum(theta.abs(), eps ** (2 / 3) * scale)
        converged = stop >= k and bool((resid[:k] <= bound[:k]).all())
        exhausted = stop == n  # the Krylov space is the whole space: T is exact
        if converged or exhausted or count >= max_iter:
            break
        if stop < m:
            continue
        # --- thick restart: keep the best Ritz vectors and the residual vector ---
        Y = S[:, :keep].to(device, dtype)
        V[:keep] = Y.T @ V[:stop]
        V[keep] = V[stop]
        T.zero_()
        T.diagonal()[:keep] = theta[:keep].to(device, dtype)
        coupling = (beta * S[stop - 1, :keep]).to(device, dtype)
        T[keep, :keep] = coupling
        T[:keep, keep] = coupling
        stop = keep
        restarts += 1

    k_out = min(k, stop)
    vectors = (S[:, :k_out].to(device, dtype).T @ V[:stop]).T
    return EigenResult(
        eigenvalues=theta[:k_out].clone(),
        eigenvectors=vectors,
        residuals=resid[:k_out].clone(),
        converged=converged or (exhausted and k_out == k),
        hvp_count=count,
        restarts=restarts,
        which=which,
    )


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
    noise left in it, orthogonalized and normalized, continues the basis in a
    new direction with coupling :math:`\beta_j \approx 0`, which is exactly a
    restart with a random vector; an exactly zero :math:`w` gives a zero row
    and zero Ritz values, never NaN.
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
