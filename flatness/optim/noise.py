r"""Random weight perturbations as pure functions over parameter lists.

Filter-wise Gaussian noise of random weight perturbation (RWP) and its adaptive
variant (ARWP), from Li et al., TMLR 2024, "Revisiting Random Weight
Perturbation for Efficiently Improving Generalization" (official code:
github.com/nblt/mARWP), and the isotropic probes used by delta-SAM.

For a parameter :math:`W` whose first dimension indexes filters (output
channels / rows), row :math:`i` is perturbed by

.. math::

    \epsilon_{i\cdot} \sim \mathcal N\!\left(0,\;
        \frac{(\sigma \lVert W_{i\cdot}\rVert)^2}{1 + \eta F_i}\right)
    \text{ i.i.d. per element},

with :math:`F \equiv 0` for plain RWP. A tensor with at most one dimension
(bias, BatchNorm affine) uses its whole-tensor norm :math:`\lVert W\rVert`,
and - as in the official code, whose accumulator keeps one entry per element
of such a tensor - its ARWP divisor :math:`\sqrt{1+\eta F_j}` is element-wise.

The ARWP accumulator is kept as per-row sums (never a full copy of the
gradient):

.. math::

    F_i \leftarrow \beta F_i + \lVert g_{i\cdot}\rVert^2,
    \qquad F^{(0)} = 0,

so the first update sets :math:`F_i = \lVert g_{i\cdot}\rVert^2` (no
:math:`1-\beta` factor), :math:`g` being the gradient at the perturbed point.

Every function has a ``foreach`` path over ``torch._foreach_*`` kernels and a
single-tensor path; both give bitwise identical results. Row reductions and
random draws have no ``_foreach_`` form in torch, so they loop over tensors in
both paths. Nothing here synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

GeneratorLike = torch.Generator | Callable[[torch.device], torch.Generator] | None


def _generator_for(generator: GeneratorLike, device: torch.device) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return generator(device)


def _row_shape(p: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a per-row vector over ``p`` (ndim > 1 only)."""
    return (p.shape[0],) + (1,) * (p.dim() - 1)


def row_norms(params: Sequence[Tensor]) -> list[Tensor]:
    """Per-filter norms: shape ``(rows,)`` for ndim > 1, a 0-dim whole norm otherwise."""
    return [
        torch.linalg.vector_norm(p.reshape(p.shape[0], -1), dim=1)
        if p.dim() > 1
        else torch.linalg.vector_norm(p)
        for p in params
    ]


def row_sq_sums(grads: Sequence[Tensor]) -> list[Tensor]:
    """Per-row sums of squares, ``(rows,)`` for ndim > 1; element-wise squares otherwise."""
    return [
        torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1).square_()
        if g.dim() > 1
        else g * g
        for g in grads
    ]


def fisher_like(p: Tensor) -> Tensor:
    """A zero ARWP accumulator for parameter ``p`` (per row, or per element if ndim <= 1)."""
    shape = (p.shape[0],) if p.dim() > 1 else p.shape
    return torch.zeros(shape, dtype=p.dtype, device=p.device)


def filterwise_std(
    params: Sequence[Tensor],
    *,
    sigma: float,
    fisher: Sequence[Tensor] | None = None,
    eta: float = 0.0,
    foreach: bool = False,
) -> list[Tensor]:
    r"""Noise standard deviations :math:`\sigma\lVert W_i\rVert / \sqrt{1+\eta F_i}`.

    Args:
        params: parameters (any shapes).
        sigma: relative noise scale.
        fisher: ARWP accumulators from :func:`fisher_like` / :func:`update_fisher_`,
            or ``None`` for plain RWP (divisor 1).
        eta: ARWP strength.
        foreach: use ``torch._foreach_*`` kernels.

    Returns:
        One tensor per parameter, broadcastable against it: ``(rows, 1, ..., 1)``
        for ndim > 1; 0-dim (RWP) or the parameter's shape (ARWP) otherwise.
    """
    if not params:
        return []
    norms = row_norms(params)
    if foreach:
        stds = torch._foreach_mul(norms, sigma)
        if fisher is not None:
            denom = torch._foreach_mul(list(fisher), eta)
            torch._foreach_add_(denom, 1.0)
            torch._foreach_sqrt_(denom)
            stds = list(torch._foreach_div(stds, denom))
    else:
        stds = []
        for i, norm in enumerate(norms):
            std = norm * sigma
            if fisher is not None:
                std = std / (fisher[i] * eta).add_(1.0).sqrt_()
            stds.append(std)
    return [s.view(_row_shape(p)) if p.dim() > 1 else s for s, p in zip(stds, params)]


def filterwise_noise_(
    params: Sequence[Tensor],
    backups: Sequence[Tensor],
    *,
    sigma: float,
    fisher: Sequence[Tensor] | None = None,
    eta: float = 0.0,
    generator: GeneratorLike = None,
    foreach: bool = False,
) -> None:
    r"""Move ``params`` to :math:`w + \epsilon` with filter-wise noise, in place.

    ``backups`` receive an exact copy of :math:`w` (restore with
    ``torch._foreach_copy_(params, backups)``). The noise is drawn directly into
    the parameters and rescaled, so no parameter-sized temporary is allocated.

    Args:
        params: parameters to perturb.
        backups: tensors of the same shapes that receive :math:`w`.
        sigma, fisher, eta, foreach: see :func:`filterwise_std`.
        generator: a ``torch.Generator``, a function ``device -> Generator``, or
            ``None`` for the global generator.
    """
    if not params:
        return
    if foreach:
        torch._foreach_copy_(list(backups), list(params))
    else:
        for p, b in zip(params, backups):
            b.copy_(p)
    # w now lives in the backups: the out-of-place form draws into the parameters (same noise, bitwise).
    filterwise_noise_into(backups, params, sigma=sigma, fisher=fisher, eta=eta, generator=generator, foreach=foreach)


def filterwise_noise_into(
    params: Sequence[Tensor],
    out: Sequence[Tensor],
    *,
    sigma: float,
    fisher: Sequence[Tensor] | None = None,
    eta: float = 0.0,
    generator: GeneratorLike = None,
    foreach: bool = False,
) -> None:
    r"""Write :math:`w + \epsilon` into ``out``, leaving ``params`` untouched.

    The same noise as :func:`filterwise_noise_` with the same generator state,
    bitwise: the draw goes straight into ``out`` and is turned into
    :math:`w + \epsilon` in one fused pass, ``out <- w + out * std``. With
    :math:`w` left in place, an optimizer can point the parameters at ``out``
    for the perturbed pass and back at :math:`w` afterwards (see
    :mod:`flatness.optim.wrapper`): no copy of :math:`w` is made at all.

    Args:
        params: parameters :math:`w` (read only).
        out: tensors of the same shapes, dtypes and devices that receive
            :math:`w + \epsilon`.
        sigma, fisher, eta, foreach: see :func:`filterwise_std`.
        generator: as for :func:`filterwise_noise_`.
    """
    if not params:
        return
    stds = filterwise_std(params, sigma=sigma, fisher=fisher, eta=eta, foreach=foreach)
    # Both paths loop: torch has no _foreach_ random kernel, and no _foreach_
    # form of ``o <- p + o * std`` with a broadcast per-row std.
    for p, o, std in zip(params, out, stds):
        o.normal_(generator=_generator_for(generator, o.device))
        torch.addcmul(p, o, std, out=o)


def sphere_noise_(
    params: Sequence[Tensor],
    backups: Sequence[Tensor],
    *,
    radius: float,
    generator: GeneratorLike = None,
    foreach: bool = False,
    eps: float = 1e-12,
) -> None:
    r"""Move ``params`` to :math:`w + r\,\xi/\lVert\xi\rVert`, :math:`\xi \sim \mathcal N(0, I)`.

    A uniformly random direction at distance ``radius`` (the norm is global over
    all tensors). ``backups`` must already hold :math:`w`; they are read, not
    written, so repeated calls draw independent probes around the same point.
    """
    if not params:
        return
    for p in params:
        p.normal_(generator=_generator_for(generator, p.device))
    device = params[0].device
    if foreach:
        norms = torch._foreach_norm(list(params))
    else:
        norms = [torch.linalg.vector_norm(p) for p in params]
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
    scale = radius / (total + eps)
    if foreach:
        torch._foreach_mul_(list(params), scale)
        torch._foreach_add_(list(params), list(backups))
    else:
        for p, b in zip(params, backups):
            p.mul_(scale.to(p.device)).add_(b)


def accumulate_fisher_(
    fisher: Sequence[Tensor],
    sq: Sequence[Tensor],
    *,
    beta: float,
    foreach: bool = False,
) -> None:
    r""":math:`F \leftarrow \beta F + s` in place, skipped per device if any ``s`` is not finite.

    The skip (an overflowing ``GradScaler`` step) is decided on the device with
    ``torch.where``, without a host synchronisation.

    Args:
        fisher: accumulators.
        sq: per-row squared sums (see :func:`row_sq_sums`), one per accumulator.
        beta: decay.
        foreach: use ``torch._foreach_*`` kernels.
    """
    fisher = list(fisher)
    by_device: dict[torch.device, list[int]] = {}
    for i, s in enumerate(sq):
        by_device.setdefault(s.device, []).append(i)
    for idx in by_device.values():
        finite = torch.stack([torch.isfinite(sq[i]).all() for i in idx]).all()
        decay = torch.where(finite, beta, 1.0).to(fisher[idx[0]].dtype)
        masked = [torch.where(finite, sq[i], 0.0) for i in idx]
        targets = [fisher[i] for i in idx]
        if foreach:
            torch._foreach_mul_(targets, decay)
            torch._foreach_add_(targets, masked)
        else:
            for f, m in zip(targets, masked):
                f.mul_(decay).add_(m)


def update_fisher_(
    fisher: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    beta: float,
    inv_scale: Tensor | None = None,
    foreach: bool = False,
) -> None:
    r"""ARWP accumulator update :math:`F \leftarrow \beta F + \lVert g_{i\cdot}\rVert^2`, in place.

    Args:
        fisher: accumulators, one per gradient (see :func:`fisher_like`).
        grads: gradients at the perturbed point.
        beta: decay of the accumulator.
        inv_scale: optional 0-dim tensor :math:`1/s` of a ``GradScaler``; the
            squared sums are multiplied by :math:`s^{-2}` so the accumulator sees
            unscaled gradients.
        foreach: use ``torch._foreach_*`` kernels.

    A step whose gradients hold any inf or NaN leaves every accumulator of that
    device unchanged (see :func:`accumulate_fisher_`).
    """
    if not grads:
        return
    sq = row_sq_sums(grads)
    if inv_scale is not None:
        factor = inv_scale * inv_scale
        if foreach:
            torch._foreach_mul_(sq, factor)
        else:
            for s in sq:
                s.mul_(factor.to(s.device))
    accumulate_fisher_(fisher, sq, beta=beta, foreach=foreach)
