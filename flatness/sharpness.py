r"""Sharpness measures of a trained network on fixed batches.

Random-perturbation sharpness, as plotted in Li et al. (TMLR 2024,
"Revisiting Random Weight Perturbation..."): the mean loss increase under
filter-wise Gaussian weight noise of relative radius :math:`\sigma`,

.. math::

    S_\sigma = \mathbb E_\epsilon\,[L(w + \epsilon)] - L(w), \qquad
    \epsilon_{i\cdot} \sim \mathcal N(0, (\sigma \lVert W_{i\cdot}\rVert)^2),

estimated with ``draws`` independent draws (1-D tensors use the whole-tensor
norm). Adversarial :math:`\rho`-sharpness (Foret et al. 2021; Keskar et al.
2017): the loss increase after one normalized ascent step,

.. math::

    S^{adv}_\rho = L\!\left(w + \rho \tfrac{g}{\lVert g\rVert}\right) - L(w),
    \qquad g = \nabla L(w).

Both are evaluated in eval mode (BatchNorm running statistics of the
checkpoint), on the same batches, and leave the weights exactly as found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flatness.losses import LossFn, batch_loss, batch_size
from flatness.optim.noise import filterwise_std

Batches = Sequence[Any]


@dataclass
class SharpnessCurve:
    """Mean loss increase (and its standard error over draws) at each radius."""

    radii: list[float]
    loss_increase: list[float]
    stderr: list[float]
    base_loss: float
    draws: int


@torch.no_grad()
def mean_loss(model: nn.Module, loss_fn: LossFn, batches: Batches) -> Tensor:
    """Sample-weighted mean of ``loss_fn`` over the batches (a 0-dim tensor, float64)."""
    total = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    count = 0
    for batch in batches:
        n = batch_size(batch)
        total += batch_loss(model, loss_fn, batch).double() * n
        count += n
    return total / count


def _filterwise_noise(params: list[Tensor], sigma: float, generator: torch.Generator) -> list[Tensor]:
    """One draw of the RWP noise (std from :func:`flatness.optim.noise.filterwise_std`, the training rule)."""
    stds = filterwise_std(params, sigma=sigma)
    return [torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) * std for p, std in zip(params, stds)]


def random_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    radii: Sequence[float] = (0.0, 0.01, 0.02, 0.05, 0.1),
    *,
    draws: int = 5,
    seed: int = 0,
) -> SharpnessCurve:
    """Random-perturbation sharpness curve :math:`S_\\sigma` for each radius.

    Args:
        radii: relative radii :math:`\\sigma` (>= 0).
        draws: noise draws per radius (>= 1); the same draws are used for
            every radius (scaled), so the curve is smooth in :math:`\\sigma`.
        seed: seed of the noise generator.
    """
    if draws < 1:
        raise ValueError(f"Invalid draws value: {draws}")
    if any(r < 0 for r in radii):
        raise ValueError(f"Invalid radii: {list(radii)} (must be >= 0)")
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters()]
    saved = [p.detach().clone() for p in params]
    device = params[0].device
    try:
        base = mean_loss(model, loss_fn, batches)
        gen = torch.Generator(device=device).manual_seed(seed)
        unit = [_filterwise_noise(saved, 1.0, gen) for _ in range(draws)]
        means, errs = [], []
        for r in radii:
            vals = []
            for noise in unit:
                with torch.no_grad():
                    for p, w, e in zip(params, saved, noise):
                        p.copy_(w + r * e)
                vals.append(mean_loss(model, loss_fn, batches) - base)
            v = torch.stack(vals)
            means.append(float(v.mean()))
            errs.append(float(v.std(unbiased=True) / draws**0.5) if draws > 1 else 0.0)
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        model.train(was_training)
    return SharpnessCurve(list(map(float, radii)), means, errs, float(base), draws)


def adversarial_sharpness(model: nn.Module, loss_fn: LossFn, batches: Batches, rho: float = 0.05) -> float:
    """Loss increase after one normalized gradient-ascent step of length ``rho``."""
    if rho <= 0:
        raise ValueError(f"Invalid rho value: {rho}")
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    try:
        n = sum(batch_size(b) for b in batches)
        grads = [torch.zeros_like(p) for p in params]
        base = torch.zeros((), dtype=torch.float64, device=saved[0].device)
        for batch in batches:
            loss = batch_loss(model, loss_fn, batch) * (batch_size(batch) / n)
            g = torch.autograd.grad(loss, params)
            torch._foreach_add_(grads, g)
            base += loss.detach().double()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        with torch.no_grad():
            torch._foreach_add_(params, torch._foreach_div(grads, norm + 1e-12), alpha=rho)
        return float(mean_loss(model, loss_fn, batches) - base)
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        model.train(was_training)
