"""Curvature of the loss: Hessian-vector products, top eigenvalues, trace, spectral density.

Two layers:

- Estimators are plain functions of an operator (``shape``, ``dtype``,
  ``device``, ``@``) or of a dense symmetric tensor:
  :func:`lanczos_top_eigs`, :func:`lanczos_smallest_eig`,
  :func:`hutchinson_trace`, :func:`hutchpp_trace`, :func:`slq_density`.
- Model-level helpers build a :class:`HessianOperator` over
  ``(model, loss_fn, batches)`` and run one estimator:
  :func:`top_eigenvalues`, :func:`smallest_eigenvalue`,
  :func:`hessian_trace`, :func:`spectral_density`,
  :func:`per_layer_curvature`.
- :func:`measure_curvature` runs everything a :class:`HessianSpec` asks for
  on ONE operator (one graph cache); :func:`measure` does it on an existing
  operator.

Example:
    >>> import torch
    >>> from torch import Tensor, nn
    >>> from flatness.curvature import top_eigenvalues
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> batches = [(torch.randn(32, 4), torch.randint(0, 3, (32,)))]
    >>> r = top_eigenvalues(model, nn.functional.cross_entropy, batches, k=2, dtype=torch.float64)
    >>> r.converged, r.eigenvalues.shape
    (True, torch.Size([2]))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flatness.curvature.density import DensityResult, broaden, slq_density
from flatness.curvature.lanczos import EigenResult, lanczos_smallest_eig, lanczos_top_eigs
from flatness.curvature.layers import LayerCurvature, per_layer_curvature
from flatness.curvature.measure import CurvatureResult, measure, measure_curvature
from flatness.curvature.operator import BACKENDS, HessianOperator, LossFn, MatrixOperator, as_operator, dense_hessian
from flatness.curvature.spec import HessianSpec
from flatness.curvature.trace import TraceResult, hutchinson_trace, hutchpp_trace

__all__ = [
    "BACKENDS",
    "CurvatureResult",
    "DensityResult",
    "EigenResult",
    "HessianOperator",
    "HessianSpec",
    "LayerCurvature",
    "MatrixOperator",
    "TraceResult",
    "as_operator",
    "broaden",
    "dense_hessian",
    "hessian_trace",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos_smallest_eig",
    "lanczos_top_eigs",
    "measure",
    "measure_curvature",
    "per_layer_curvature",
    "slq_density",
    "smallest_eigenvalue",
    "spectral_density",
    "top_eigenvalues",
]

TRACE_METHODS = ("hutch++", "hutchinson")


def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    k: int = 5,
    tol: float = 1e-6,
    *,
    max_iter: int = 500,
    ncv: int | None = None,
    params: Iterable[nn.Parameter | str] | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "graph",
    seed: int = 0,
    init: Sequence[Tensor] | Tensor | None = None,
    return_vectors: bool = False,
    block_size: int | None = None,
    failure_probability: float = 1e-3,
) -> EigenResult:
    """The ``k`` largest Hessian eigenvalues of the mean loss over ``batches``.

    Builds a :class:`HessianOperator` (eval mode, exact batch weighting) and
    runs :func:`lanczos_top_eigs`: block Lanczos, then a random-start check
    that no eigenvalue was missed (``converged`` means both held).

    Args:
        model: the network (its parameters give the point and the device).
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced.
        batches: an iterable of ``(inputs, targets)``.
        k: number of eigenvalues.
        tol: relative eigenvalue-error tolerance (see :func:`lanczos_top_eigs`);
            below about ``1e-6`` use ``dtype=torch.float64``.
        max_iter: most Hessian-vector products (the check's included).
        ncv: Lanczos basis size (default ``max(2k + 1, 20)``).
        params: restrict to these parameters (objects or names).
        dtype: ``torch.float32`` or ``torch.float64`` (default: the model's).
        backend: HVP backend (see :class:`HessianOperator`).
        seed: seed of the Lanczos start vector.
        init: warm start: flat vectors over the operator's parameters (e.g.
            ``.eigenvectors`` of an earlier call); their sum of unit vectors
            starts the Lanczos basis (a few products when they are close).
        return_vectors: keep the eigenvectors.
        block_size: Lanczos block size (default from ``k``; see
            :func:`lanczos_top_eigs`).
        failure_probability: the most probability that the check misses an
            eigenvalue the search missed.

    Returns:
        :class:`EigenResult` with ``.eigenvalues`` (descending),
        ``.residuals``, ``.error_bounds``, ``.converged``, ``.hvp_count``;
        ``.eigenvectors`` is a list of ``k`` flat tensors in
        ``model.parameters()`` order over the parameters used (with
        ``return_vectors``), else ``None``.
    """
    H = HessianOperator(model, loss_fn, batches, params, dtype=dtype, backend=backend)
    result = lanczos_top_eigs(
        H, k, tol, max_iter, ncv=ncv, seed=seed, v0=init, block_size=block_size, failure_probability=failure_probability
    )
    result.eigenvectors = list(result.eigenvectors.T) if return_vectors else None
    return result


def smallest_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    tol: float = 1e-6,
    *,
    max_iter: int = 500,
    params: Iterable[nn.Parameter | str] | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "graph",
    seed: int = 0,
) -> EigenResult:
    """The smallest (most negative) Hessian eigenvalue; arguments as :func:`top_eigenvalues`.

    Returns:
        :class:`EigenResult` with one eigenvalue.
    """
    H = HessianOperator(model, loss_fn, batches, params, dtype=dtype, backend=backend)
    return lanczos_smallest_eig(H, tol, max_iter, seed=seed)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    num_matvecs: int = 99,
    *,
    method: str = "hutch++",
    params: Iterable[nn.Parameter | str] | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "graph",
    seed: int = 0,
) -> TraceResult:
    """Stochastic estimate of the Hessian trace with a standard error.

    Args:
        model: the network.
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced.
        batches: an iterable of ``(inputs, targets)``.
        num_matvecs: Hessian-vector products to spend.
        method: ``"hutch++"`` (default, Meyer et al. 2021) or ``"hutchinson"``.
        params: restrict to these parameters (objects or names).
        dtype: ``torch.float32`` or ``torch.float64`` (default: the model's).
        backend: HVP backend (see :class:`HessianOperator`).
        seed: seed of the random probes.

    Returns:
        :class:`TraceResult` with ``.trace``, ``.stderr``, ``.hvp_count``.
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {', '.join(map(repr, TRACE_METHODS))}")
    H = HessianOperator(model, loss_fn, batches, params, dtype=dtype, backend=backend)
    if method == "hutch++":
        return hutchpp_trace(H, num_matvecs, seed=seed)
    return hutchinson_trace(H, num_matvecs, seed=seed)


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    num_steps: int = 80,
    num_runs: int = 2,
    *,
    num_points: int = 10_000,
    sigma: float | None = None,
    params: Iterable[nn.Parameter | str] | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "graph",
    seed: int = 0,
) -> DensityResult:
    """Hessian eigenvalue density by stochastic Lanczos quadrature (:func:`slq_density`).

    Args:
        model: the network.
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced.
        batches: an iterable of ``(inputs, targets)``.
        num_steps: Lanczos steps per run.
        num_runs: random start vectors.
        num_points: points of the output grid.
        sigma: Gaussian broadening (default: half the mean node spacing).
        params: restrict to these parameters (objects or names).
        dtype: ``torch.float32`` or ``torch.float64`` (default: the model's).
        backend: HVP backend (see :class:`HessianOperator`).
        seed: seed of the start vectors.

    Returns:
        :class:`DensityResult` with ``.grid``, ``.density``, ``.nodes``,
        ``.weights``, ``.hvp_count``.
    """
    H = HessianOperator(model, loss_fn, batches, params, dtype=dtype, backend=backend)
    return slq_density(H, num_steps, num_runs, num_points=num_points, sigma=sigma, seed=seed)
