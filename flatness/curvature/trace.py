r"""Stochastic trace estimators: Hutchinson and Hutch++.

Hutchinson (1989): for Rademacher vectors :math:`z_i` (entries :math:`\pm 1`),
:math:`\mathbb E[z^\top H z] = \operatorname{tr} H`, and

.. math::

    \widehat{\operatorname{tr}} = \frac1m \sum_{i=1}^m z_i^\top H z_i, \qquad
    \operatorname{Var}[z^\top H z] = 2\Bigl(\|H\|_F^2 - \sum_i H_{ii}^2\Bigr),

so the relative error falls like :math:`1/\sqrt m`.

Hutch++ (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal Stochastic
Trace Estimation") spends a third of the products on a sketch
:math:`Q = \operatorname{orth}(HS)` that captures the top of the spectrum,
takes that part exactly, and runs Hutchinson only on the deflated rest:

.. math::

    \widehat{\operatorname{tr}} = \operatorname{tr}(Q^\top H Q) +
    \frac{1}{g} \sum_{i=1}^{g} z_i^\top (I - QQ^\top) H (I - QQ^\top) z_i .

Hessians of trained networks have a few large outliers and a bulk near
zero, exactly the case where Hutch++ wins (error :math:`O(1/m)` instead of
:math:`O(1/\sqrt m)` for fast-decaying spectra).

Both keep their samples on the device and synchronise once at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flatness.curvature.operator import as_operator


@dataclass
class TraceResult:
    """A trace estimate.

    Attributes:
        trace: the estimate.
        stderr: its standard error (sample standard deviation of the
            Hutchinson terms over :math:`\\sqrt g`; for Hutch++ only the
            stochastic residual part varies, given the sketch).
        hvp_count: operator products used.
        method: ``"hutchinson"`` or ``"hutch++"``.
        samples: the Hutchinson terms :math:`z_i^\\top H z_i` (on the host).
    """

    trace: float
    stderr: float
    hvp_count: int
    method: str
    samples: Tensor

    def to_dict(self) -> dict[str, Any]:
        return {"trace": self.trace, "stderr": self.stderr, "hvp_count": self.hvp_count, "method": self.method}


def hutchinson_trace(H: Any, num_matvecs: int = 100, *, seed: int = 0) -> TraceResult:
    """Hutchinson's estimate of :math:`\\operatorname{tr} H` with ``num_matvecs`` Rademacher probes.

    Args:
        H: an operator or a dense symmetric tensor.
        num_matvecs: probes (= products with ``H``), at least 2.
        seed: seed of the probes (the same on every rank under torch.distributed).

    Example:
        >>> import torch
        >>> r = hutchinson_trace(torch.eye(50, dtype=torch.float64), 10)
        >>> r.trace, r.stderr
        (50.0, 0.0)
    """
    A = as_operator(H)
    if num_matvecs < 2:
        raise ValueError(f"Invalid num_matvecs value: {num_matvecs} (expected >= 2)")
    n = int(A.shape[0])
    gen = torch.Generator(device=A.device).manual_seed(seed)
    samples = torch.empty(num_matvecs, dtype=A.dtype, device=A.device)
    for i in range(num_matvecs):
        z = rademacher((n,), gen, A.dtype, A.device)
        samples[i] = torch.dot(z, A @ z)
    samples = samples.to("cpu", torch.float64)
    return TraceResult(
        trace=float(samples.mean()),
        stderr=float(samples.std() / math.sqrt(num_matvecs)),
        hvp_count=num_matvecs,
        method="hutchinson",
        samples=samples,
    )


def hutchpp_trace(H: Any, num_matvecs: int = 99, *, seed: int = 0) -> TraceResult:
    """Hutch++ estimate of :math:`\\operatorname{tr} H` (Meyer et al. 2021) in ``num_matvecs`` products.

    ``s = num_matvecs // 3`` products sketch :math:`HS`, ``s`` more give
    :math:`\\operatorname{tr}(Q^\\top HQ)`, and the remaining
    ``g = num_matvecs - 2s`` are Hutchinson probes of the deflated operator.

    Args:
        H: an operator or a dense symmetric tensor.
        num_matvecs: total products, at least 4.
        seed: seed of the sketch and probes.

    Memory: two ``n x s`` matrices on the operator's device.
    """
    A = as_operator(H)
    if num_matvecs < 4:
        raise ValueError(f"Invalid num_matvecs value: {num_matvecs} (expected >= 4)")
    n = int(A.shape[0])
    s = min(num_matvecs // 3, n)
    g = num_matvecs - 2 * s
    gen = torch.Generator(device=A.device).manual_seed(seed)
    sketch = torch.empty(n, s, dtype=A.dtype, device=A.device)
    for j in range(s):
        sketch[:, j] = A @ rademacher((n,), gen, A.dtype, A.device)
    Q, _ = torch.linalg.qr(sketch)
    del sketch
    exact = torch.zeros((), dtype=A.dtype, device=A.device)
    for j in range(s):
        exact += torch.dot(Q[:, j], A @ Q[:, j])
    samples = torch.empty(g, dtype=A.dtype, device=A.device)
    for i in range(g):
        z = rademacher((n,), gen, A.dtype, A.device)
        z = z - Q @ (Q.T @ z)
        samples[i] = torch.dot(z, A @ z)
    samples = samples.to("cpu", torch.float64)
    stderr = float(samples.std() / math.sqrt(g)) if g > 1 else float("nan")
    return TraceResult(
        trace=float(exact) + float(samples.mean()),
        stderr=stderr,
        hvp_count=2 * s + g,
        method="hutch++",
        samples=samples,
    )


def rademacher(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Entries :math:`\\pm 1` with equal probability, drawn on ``device``."""
    return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype).mul_(2).sub_(1)
