r"""Surface axes along the Hessian's own top eigenvectors.

For the loss :math:`L` at the centre :math:`\theta` with Hessian
:math:`H = \nabla^2 L(\theta)`, the directions are the unit eigenvectors
:math:`v_1` (and :math:`v_2`) of its largest eigenvalues
:math:`\lambda_1 \ge \lambda_2`, from :func:`flatness.curvature.top_eigenvalues`
(Lanczos). Along :math:`v_1` the surface is, to second order,

.. math::

    f(\alpha) = L(\theta + \alpha v_1) \approx L(\theta) + \alpha\, g^\top v_1
    + \tfrac12 \lambda_1 \alpha^2,

so its second difference at the centre,
:math:`(f(h) - 2 f(0) + f(-h)) / h^2`, equals :math:`\lambda_1` as
:math:`h \to 0`: the sharpest cut through the minimum (as used by Yao et al.
2020, PyHessian, for their 1-D and 2-D "Hessian-direction" plots).

With ``normalize="filter"`` each filter of the eigenvector is rescaled to the
norm of the matching weight filter (Li et al. 2018), which makes the picture
comparable with random filter-normalized ones but loses the unit-length
property (the second difference then no longer equals :math:`\lambda_1`).
The eigenvector's sign is fixed so that its largest-magnitude entry is
positive, so the same model gives the same picture.

Units that receive no gradient (a dead ReLU) have zero Hessian rows, so an
eigenvector of a nonzero eigenvalue is zero there; the Lanczos Ritz vector
is zero only up to its accuracy: with residual :math:`r = Hv - \lambda v`,
those entries satisfy :math:`\lambda v_i = -r_i`, so
:math:`|v_i| \le \lVert r \rVert / |\lambda|`. Before filter
normalization, every filter whose norm is below that bound is set to zero,
so it stays zero instead of being rescaled to the full filter norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flatness.errors import FlatnessError
from flatness.landscape.directions import Direction, normalize_direction


def hessian_directions(
    model: nn.Module,
    loss_fn: Any,
    batches: Sequence[Any],
    dim: int,
    *,
    normalize: str = "none",
    seed: int = 0,
) -> tuple[list[Direction], list[float]]:
    """The top ``dim`` Hessian eigenvectors as directions, and their eigenvalues.

    Args:
        model: the network at the centre (its parameters; frozen ones get zero entries).
        loss_fn: ``loss_fn(output, target)`` or a :class:`~flatness.losses.ModelLoss`.
        batches: the surface's batches (the Hessian of their mean loss).
        dim: 1 or 2 directions.
        normalize: ``"none"`` (unit eigenvectors) or ``"filter"``.
        seed: seed of the Lanczos start vector.

    Returns:
        ``(directions, eigenvalues)``: lists of ``dim`` directions (tensors
        like ``model.parameters()``) and the matching eigenvalues.

    Raises:
        ValueError: unknown ``normalize``.
        FlatnessError: the model has fewer trainable parameters than ``dim``.
    """
    from flatness.curvature import top_eigenvalues

    if normalize not in ("none", "filter"):
        raise ValueError(f"Unknown normalize {normalize!r}; expected 'none' or 'filter'")
    params = list(model.parameters())
    used = [p for p in params if p.requires_grad]
    n = sum(p.numel() for p in used)
    if n < dim:
        raise FlatnessError(
            f"--directions hessian --dim {dim} needs {dim} Hessian eigenvectors, but the model has {n} trainable "
            f"parameter{'s' if n != 1 else ''}: pass --dim {n}" if n else "--directions hessian: the model has no trainable parameters"
        )
    dtype = params[0].dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    result = top_eigenvalues(model, loss_fn, batches, k=dim, tol=tol, seed=seed, return_vectors=True)
    dirs: list[Direction] = []
    for vector in list(result.eigenvectors)[:dim]:
        v = vector.detach().to(device=params[0].device, dtype=dtype)
        v = v * torch.sign(v[v.abs().argmax()])
        dirs.append(_unflatten(v, params, used))
    if normalize == "filter":
        weights = [p.detach() for p in params]
        bounds = [float(r) / max(abs(float(e)), 1e-30) for r, e in zip(result.residuals, result.eigenvalues)]
        dirs = [normalize_direction(_zero_below(d, bound), weights, norm="filter", ignore="none") for d, bound in zip(dirs, bounds)]
    return dirs, [float(e) for e in result.eigenvalues[:dim]]


def _zero_below(direction: Direction, bound: float) -> Direction:
    """``direction`` with every filter (slice along the first dimension; a 1-D tensor as a whole) of norm <= ``bound`` zeroed."""
    out: Direction = []
    for d in direction:
        if d.ndim >= 2:
            keep = (d.flatten(1).norm(dim=1) > bound).to(d.dtype).view(-1, *([1] * (d.ndim - 1)))
            out.append(d * keep)
        else:
            out.append(d if float(d.norm()) > bound else torch.zeros_like(d))
    return out


def _unflatten(v: Tensor, params: list[Tensor], used: list[Tensor]) -> Direction:
    """A flat vector over ``used`` -> one tensor per parameter (zeros for the others)."""
    if v.numel() != sum(p.numel() for p in used):
        raise ValueError(f"eigenvector has {v.numel()} entries but the trainable parameters have {sum(p.numel() for p in used)}")
    ids = {id(p) for p in used}
    out: Direction = []
    offset = 0
    for p in params:
        if id(p) in ids:
            out.append(v[offset : offset + p.numel()].view_as(p).clone())
            offset += p.numel()
        else:
            out.append(torch.zeros_like(p))
    return out
