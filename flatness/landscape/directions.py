r"""Plotting directions in weight space: random (filter / layer / model normalized) and interpolation.

A direction is a list of tensors, one per parameter of ``model.parameters()``,
in that order, with the parameters' shapes. The surface plotted along
directions :math:`\delta` (and :math:`\eta`) around weights :math:`\theta` is

.. math::

    f(\alpha) = L(\theta + \alpha\,\delta), \qquad
    f(\alpha, \beta) = L(\theta + \alpha\,\delta + \beta\,\eta).

Random directions follow Li et al. 2018, "Visualizing the Loss Landscape of
Neural Nets" (NeurIPS): draw :math:`d \sim \mathcal N(0, I)` and rescale each
filter :math:`d_{i,j}` (row ``j`` of layer ``i``, i.e. slice ``[j]`` along the
first dimension) to the norm of the matching filter of the weights,

.. math::

    d_{i,j} \leftarrow \frac{d_{i,j}}{\lVert d_{i,j} \rVert + \epsilon}\,
    \lVert \theta_{i,j} \rVert,

which removes the scale invariance of ReLU networks from the picture. The
``layer`` variant rescales each parameter tensor as a whole and ``model``
the whole direction at once. With ``ignore="biasbn"`` (the default, as in the
paper) the entries of one-dimensional parameters (biases and BatchNorm
weights) are set to zero; with ``ignore="none"`` they are kept and
normalized as one "filter" per tensor (loss-landscape instead copies the
weights there; we keep the same rule as the project's filter-wise noise).

A filter (or tensor) of the direction that is numerically zero, at most
``zero_tol`` times the direction's largest filter norm, stays zero instead of
being blown up to the weights' norm: a Gaussian draw never has one, but a
Hessian eigenvector has exact or round-off zeros on units that receive no
gradient (dead ReLUs, unused embeddings), and rescaling that noise to a full
filter norm would move the plot along a direction the curvature never chose.
Such a filter is treated like an ignored one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

Direction = list[Tensor]

NORMS = ("filter", "layer", "model")
IGNORES = ("biasbn", "none")


def model_weights(model: nn.Module) -> list[Tensor]:
    """Detached copies of ``model.parameters()`` (the centre of a surface)."""
    return [p.detach().clone() for p in model.parameters()]


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"Unknown norm {norm!r}; expected 'filter', 'layer' or 'model'")


def _check_ignore(ignore: str) -> None:
    if ignore not in IGNORES:
        raise ValueError(f"Unknown ignore {ignore!r}; expected 'biasbn' or 'none'")


def is_biasbn(weight: Tensor) -> bool:
    """True for parameters that ``ignore="biasbn"`` zeroes: biases and BatchNorm scales (``ndim <= 1``)."""
    return weight.ndim <= 1


def apply_ignore(direction: Sequence[Tensor], ignore: str = "biasbn") -> Direction:
    """A copy of ``direction`` with one-dimensional entries zeroed when ``ignore == "biasbn"``."""
    _check_ignore(ignore)
    if ignore == "none":
        return [d.clone() for d in direction]
    return [torch.zeros_like(d) if is_biasbn(d) else d.clone() for d in direction]


def normalize_direction(
    direction: Sequence[Tensor],
    weights: Sequence[Tensor],
    *,
    norm: str = "filter",
    ignore: str = "biasbn",
    eps: float = 1e-10,
    zero_tol: float = 1e-6,
) -> Direction:
    r"""Rescale ``direction`` to the scale of ``weights`` (Li et al. 2018).

    Args:
        direction: one tensor per parameter.
        weights: the centre weights, same shapes.
        norm: ``"filter"`` (each slice along the first dimension gets the
            norm of the matching weight slice), ``"layer"`` (each tensor gets
            the norm of its weight tensor) or ``"model"`` (the whole direction
            gets the norm of all included weights).
        ignore: ``"biasbn"`` zeroes one-dimensional parameters; ``"none"``
            keeps them, normalized as a whole tensor.
        eps: added to the direction's norms, :math:`d / (\lVert d \rVert + \epsilon)`.
        zero_tol: a filter (``filter``) or tensor (``layer``) whose norm is at
            most ``zero_tol`` times the largest such norm in the direction is
            numerically zero and stays zero (not rescaled to the weights' norm).

    Returns:
        A new list of tensors.

    Raises:
        ValueError: unknown ``norm`` / ``ignore``, or mismatched shapes.

    Example:
        >>> w = [torch.ones(2, 3)]
        >>> d = normalize_direction([torch.randn(2, 3)], w)
        >>> torch.allclose(d[0].norm(dim=1), w[0].norm(dim=1))
        True
    """
    _check_norm(norm)
    _check_ignore(ignore)
    if len(direction) != len(weights):
        raise ValueError(f"direction has {len(direction)} tensors but the model has {len(weights)} parameters")
    for d, w in zip(direction, weights):
        if d.shape != w.shape:
            raise ValueError(f"direction entry of shape {tuple(d.shape)} does not match parameter of shape {tuple(w.shape)}")
    floor = zero_tol * _largest_unit_norm(direction, weights, norm=norm, ignore=ignore)
    out: Direction = []
    for d, w in zip(direction, weights):
        if is_biasbn(w) and ignore == "biasbn":
            out.append(torch.zeros_like(d))
        elif norm == "filter" and w.ndim >= 2:
            dn = d.flatten(1).norm(dim=1)
            wn = w.flatten(1).norm(dim=1)
            scale = torch.where(dn > floor, wn / (dn + eps), torch.zeros_like(dn)).view(-1, *([1] * (d.ndim - 1)))
            out.append(d * scale)
        elif norm in ("filter", "layer"):
            dn = d.norm()
            out.append(d * (w.norm() / (dn + eps)) if float(dn) > floor else torch.zeros_like(d))
        else:  # "model": scaled together below
            out.append(d.clone())
    if norm == "model":
        keep = [i for i, w in enumerate(weights) if not (is_biasbn(w) and ignore == "biasbn")]
        if keep:
            wn = torch.sqrt(sum(weights[i].double().pow(2).sum() for i in keep))
            dn = torch.sqrt(sum(out[i].double().pow(2).sum() for i in keep))
            scale = (wn / (dn + eps)).to(out[keep[0]].dtype)
            for i in keep:
                out[i] = out[i] * scale
    return out


def _largest_unit_norm(direction: Sequence[Tensor], weights: Sequence[Tensor], *, norm: str, ignore: str) -> float:
    """The largest norm of one normalization unit (filter, tensor, or the whole direction) among the included entries."""
    norms = [0.0]
    for d, w in zip(direction, weights):
        if is_biasbn(w) and ignore == "biasbn":
            continue
        if norm == "filter" and w.ndim >= 2 and d.numel():
            norms.append(float(d.flatten(1).norm(dim=1).max()))
        elif norm == "model":
            norms.append(float(d.double().pow(2).sum()))
        else:
            norms.append(float(d.norm()))
    return float(sum(norms)) ** 0.5 if norm == "model" else max(norms)


def random_direction(
    weights: Sequence[Tensor],
    *,
    norm: str = "filter",
    ignore: str = "biasbn",
    generator: torch.Generator | None = None,
) -> Direction:
    """A Gaussian direction normalized to ``weights`` (see :func:`normalize_direction`).

    The Gaussian entries are drawn on the CPU from ``generator`` (in
    parameter order, every parameter, ignored ones included) and then moved
    to each weight's device, so a seed gives the same direction on any device.
    """
    _check_norm(norm)
    _check_ignore(ignore)
    raw = [torch.randn(w.shape, generator=generator, dtype=w.dtype, device="cpu").to(w.device) for w in weights]
    return normalize_direction(raw, weights, norm=norm, ignore=ignore)


def random_directions(
    weights: Sequence[Tensor] | nn.Module,
    dim: int,
    *,
    norm: str = "filter",
    ignore: str = "biasbn",
    seed: int = 0,
) -> list[Direction]:
    """``dim`` (1 or 2) random normalized directions from one seeded generator (x first, then y).

    Example:
        >>> net = nn.Linear(3, 2)
        >>> dx, dy = random_directions(net, 2, seed=0)
        >>> [t.shape for t in dx]
        [torch.Size([2, 3]), torch.Size([2])]
    """
    if dim not in (1, 2):
        raise ValueError(f"Invalid dim value: {dim}; expected 1 or 2")
    if isinstance(weights, nn.Module):
        weights = model_weights(weights)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return [random_direction(weights, norm=norm, ignore=ignore, generator=g) for _ in range(dim)]


def interpolation_directions(
    center: Sequence[Tensor],
    targets: Sequence[Sequence[Tensor]],
    *,
    ignore: str = "none",
) -> list[Direction]:
    r"""Directions from ``center`` to each target: the line through two models, the plane through three.

    Direction ``k`` is :math:`\theta_k - \theta_0`, so the point ``x = 1``
    (or ``(1, 0)`` / ``(0, 1)``) holds the weights of target ``k`` (up to the
    BatchNorm running statistics, which stay those of the centre). With
    ``ignore="biasbn"`` one-dimensional entries are zeroed.
    """
    _check_ignore(ignore)
    dirs: list[Direction] = []
    for target in targets:
        if len(target) != len(center):
            raise ValueError(f"target has {len(target)} tensors but the centre has {len(center)}")
        diff = []
        for w, t in zip(center, target):
            if w.shape != t.shape:
                raise ValueError(f"target parameter of shape {tuple(t.shape)} does not match centre shape {tuple(w.shape)}")
            diff.append(t.to(device=w.device, dtype=w.dtype) - w)
        dirs.append(apply_ignore(diff, ignore))
    return dirs


def flatten(direction: Sequence[Tensor], dtype: torch.dtype = torch.float64) -> Tensor:
    """Concatenate a direction into one vector (on the CPU, ``dtype``)."""
    return torch.cat([d.detach().reshape(-1).to(device="cpu", dtype=dtype) for d in direction])
