"""All Hessian measures of one ``(model, loss, batches)`` on ONE operator.

:func:`measure_curvature` builds one :class:`HessianOperator` (one graph
cache) and runs on it what a :class:`HessianSpec` asks for: top eigenvalues
(Lanczos), trace (Hutch++ / Hutchinson), spectral density (SLQ) and
per-layer blocks. ``flatness hessian`` and ``flatness compare`` both call it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from flatness.curvature.density import DensityResult, slq_density
from flatness.curvature.lanczos import EigenResult, NonFiniteOperatorError, lanczos_top_eigs
from flatness.curvature.layers import LayerCurvature, per_layer_curvature
from flatness.curvature.operator import HessianOperator
from flatness.curvature.spec import HessianSpec
from flatness.curvature.trace import TraceResult, hutchinson_trace, hutchpp_trace
from flatness.errors import FlatnessError
from flatness.losses import LossFn


@dataclass
class CurvatureResult:
    """What :func:`measure_curvature` found.

    Attributes:
        spec: the settings.
        num_params: size of the operator.
        bn_mode: ``"eval"`` when the model has BatchNorm, else ``"none"``.
        loss: mean loss over the batches.
        gradient_norm: norm of its gradient.
        eigen: top eigenvalues.
        trace: trace estimate or ``None``.
        density: spectral density or ``None``.
        per_layer: per-block results or ``None``.
        hvp_counts: products per measure.
        seconds: wall time of the measures.
    """

    spec: HessianSpec
    num_params: int
    bn_mode: str
    loss: float
    gradient_norm: float
    eigen: EigenResult
    trace: TraceResult | None
    density: DensityResult | None
    per_layer: list[LayerCurvature] | None
    hvp_counts: dict[str, int]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The JSON keys of ``flatness hessian`` (DESIGN.md section 4) that come from the measures."""
        tr = self.trace
        return {
            "num_params": self.num_params,
            "bn_mode": self.bn_mode,
            "loss": self.loss,
            "gradient_norm": self.gradient_norm,
            "top_k": self.spec.top_k,
            "tol": self.spec.tol,
            "top_eigenvalues": self.eigen.eigenvalues.tolist(),
            "residuals": self.eigen.residuals.tolist(),
            "error_bounds": self.eigen.error_bounds.tolist() if self.eigen.error_bounds is not None else None,
            "converged": self.eigen.converged,
            "certified_by": self.eigen.certified_by,
            "verification": dict(self.eigen.verification),
            "block_size": self.eigen.block_size,
            "restarts": self.eigen.restarts,
            "trace": tr.trace if tr is not None else None,
            "trace_stderr": _finite_or_none(tr.stderr) if tr is not None else None,
            "trace_method": tr.method if tr is not None else None,
            "density": self.density.to_dict() if self.density is not None else None,
            "per_layer": [b.to_dict() for b in self.per_layer] if self.per_layer is not None else None,
            "hvp_count": sum(self.hvp_counts.values()),
            "hvp_counts": dict(self.hvp_counts),
            "seconds": self.seconds,
            "spec": asdict(self.spec),
        }


def measure_curvature(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    spec: HessianSpec,
    *,
    on_hvp: Callable[[int], None] | None = None,
) -> CurvatureResult:
    """Every measure ``spec`` asks for, on one :class:`HessianOperator` of ``(model, loss_fn, batches)``.

    Args:
        model: the network (eval mode is used; its own mode is restored).
        loss_fn: ``loss_fn(output, target)`` or a :class:`flatness.losses.ModelLoss`.
        batches: the batches (all of them define the loss; weighted by size).
        spec: what to measure (validated when it was built).
        on_hvp: called with the running product count after every product.

    Returns:
        :class:`CurvatureResult`.

    Raises:
        FlatnessError: ``spec.top_k`` too large for the model, a loss that is
            not finite, or fewer than ``top_k`` eigenvalues found.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> batches = [(torch.randn(32, 4), torch.randint(0, 3, (32,)))]
        >>> r = measure_curvature(model, nn.functional.cross_entropy, batches, HessianSpec(top_k=2, trace=True))
        >>> len(r.eigen.eigenvalues), r.trace is not None
        (2, True)
    """
    H = HessianOperator(model, loss_fn, batches, dtype=spec.torch_dtype, backend=spec.backend, callback=on_hvp)
    return measure(H, spec)


def measure(H: HessianOperator, spec: HessianSpec) -> CurvatureResult:
    """The measures of ``spec`` on an existing operator (shares its graph cache)."""
    spec.check_size(H.shape[0])
    start = time.perf_counter()
    loss, grad = check_finite_point(H)
    with finite_products(H):
        return _measure(H, spec, loss, grad, start)


def _measure(H: HessianOperator, spec: HessianSpec, loss: torch.Tensor, grad: torch.Tensor, start: float) -> CurvatureResult:
    counts = {"eigenvalues": 0, "trace": 0, "density": 0, "per_layer": 0}
    before = H.hvp_count
    eig = lanczos_top_eigs(H, spec.top_k, spec.tol, spec.max_iter, seed=spec.seed)
    counts["eigenvalues"] = H.hvp_count - before
    if len(eig.eigenvalues) < spec.top_k:
        raise FlatnessError(f"Lanczos found {len(eig.eigenvalues)} of {spec.top_k} eigenvalues in {spec.max_iter} products; raise --max-iter")
    trace = density = layers = None
    if spec.trace:
        before = H.hvp_count
        estimate = hutchpp_trace if spec.trace_method == "hutch++" else hutchinson_trace
        trace = estimate(H, spec.trace_matvecs, seed=spec.seed)
        if not math.isfinite(trace.trace):
            raise NonFiniteOperatorError(f"the trace estimate is {trace.trace}")
        counts["trace"] = H.hvp_count - before
    if spec.density:
        before = H.hvp_count
        density = slq_density(H, spec.density_steps, spec.density_runs, num_points=spec.density_points, seed=spec.seed)
        counts["density"] = H.hvp_count - before
    if spec.per_layer is not None:
        before = H.hvp_count
        layers = per_layer_curvature(H.model, H.loss_fn, [], by=spec.per_layer, tol=spec.tol, trace_matvecs=spec.trace_matvecs, seed=spec.seed, operator=H)
        counts["per_layer"] = H.hvp_count - before
    return CurvatureResult(
        spec=spec, num_params=H.shape[0], bn_mode=H.bn_mode, loss=float(loss), gradient_norm=float(torch.linalg.vector_norm(grad.double())),
        eigen=eig, trace=trace, density=density, per_layer=layers, hvp_counts=counts, seconds=time.perf_counter() - start,
    )  # fmt: skip


def check_finite_point(H: HessianOperator) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and gradient at the operator's point, both finite.

    Raises:
        FlatnessError: the loss is NaN/inf (no Hessian there), or the gradient
            overflows although the loss is finite (weights too large for the dtype).
    """
    loss, grad = H.loss_and_gradient()
    if not bool(torch.isfinite(loss)):
        raise FlatnessError(f"the loss is {float(loss)} at this point; its Hessian is not defined")
    if not bool(torch.isfinite(grad).all()):
        raise FlatnessError(
            f"the gradient overflows (NaN or inf) at this point although the loss is {float(loss):.4g}: the weights are too "
            f"large for {str(H.dtype).replace('torch.', '')}; check the checkpoint, or measure in float64 (hessian --dtype float64)"
        )
    return loss, grad


@contextlib.contextmanager
def finite_products(H: HessianOperator) -> Iterator[None]:
    """Turn Hessian-vector products that overflow into one :class:`FlatnessError` line.

    Raises:
        FlatnessError: an estimator met NaN/inf products.
    """
    try:
        yield
    except NonFiniteOperatorError:
        raise FlatnessError(
            f"the Hessian-vector products overflow (NaN or inf) at this point: the weights are too large for "
            f"{str(H.dtype).replace('torch.', '')}; check the checkpoint, or measure in float64 (hessian --dtype float64)"
        ) from None


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
