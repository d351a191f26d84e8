r"""A single-process transcription of ``flatness train --parallel-roles`` (2 processes, m-ARWP).

What the two-process run computes, written out as one plain loop (no
:mod:`torch.distributed`, no optimizer class): for update :math:`t` on global
batch :math:`B_t` (positions ``t*bs .. (t+1)*bs`` of the data epoch's
permutation), rank 0 holds :math:`B_t^{(0)}` = the even positions of
:math:`B_t` and rank 1 :math:`B_t^{(1)}` = the odd ones, and

.. math::

    g_t = \lambda\,\nabla L(w_t + \epsilon_t;\ B_t^{(1)})
        + (1-\lambda)\,\nabla L(w_t;\ B_t^{(0)}),

    \epsilon_{t,i} = \frac{\sigma\,\lVert W_{t,i}\rVert}{\sqrt{1 + \eta F_{t,i}}}\, z_{t,i},
    \qquad F_{t+1,i} = \beta F_{t,i} + \lVert \nabla_i L(w_t + \epsilon_t;\ B_t^{(1)})\rVert^2,

followed by SGD (momentum, weight decay) at the cosine learning rate of
update :math:`t`. :math:`z_t` comes from noise stream 0 (the one perturbed
rank), draw :math:`t` (:class:`flatness.optim.rng.NoiseGenerators`); the
clean rank draws nothing. The squared row norms of the accumulator come from
:func:`flatness.optim.noise.row_sq_sums` (its reduction kernel: a ``pow(2).sum(1)``
differs in the last bit, and over 16 updates at sigma 0.5 that grows to 4e-7);
everything else (row norms of the noise, the ARWP divisor, the accumulator,
the mixing, the SGD step, the schedule) is written here by hand.

The data order and the model's initial weights come from the trainer's own
pieces (the per-epoch permutation, ``torch.manual_seed(seed)`` then
``build_model``), since they are the trainer's conventions, not the method.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatness.data import load_dataset
from flatness.models import build_model
from flatness.optim.noise import row_sq_sums
from flatness.optim.rng import NoiseGenerators
from flatness.training.loop import _epoch_order, split_validation


def _noise_std(w: Tensor, f: Tensor, *, sigma: float, eta: float) -> Tensor:
    """sigma * ||W_i|| / sqrt(1 + eta F_i), broadcastable against ``w`` (1-D: whole-tensor norm)."""
    if w.dim() > 1:
        norm = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)
        return (norm * sigma / (f * eta + 1.0).sqrt()).view((w.shape[0],) + (1,) * (w.dim() - 1))
    return torch.linalg.vector_norm(w) * sigma / (f * eta + 1.0).sqrt()


def _grads(model: nn.Module, weights: list[Tensor], x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
    """Gradient of the mean cross-entropy on (x, y) at ``weights`` (loaded into ``model``)."""
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()], loss.detach()


def two_role_marwp(config: dict[str, Any], *, swap_roles: bool = False) -> tuple[dict[str, Tensor], list[float]]:
    """Final state_dict and per-epoch ``train_loss`` of a 2-process ``--parallel-roles`` m-ARWP run.

    Args:
        config: the run's resolved settings (``config.json`` / the checkpoint's ``config``).
        swap_roles: give the perturbed role the even positions and the clean role
            the odd ones (a wrong reading, to see the comparison fail).

    Returns:
        The weights after the last update, and per epoch the mean over the global batch
        of the loss each rank saw (clean loss on rank 0's half, perturbed loss on
        rank 1's half), as ``metrics.jsonl`` reports it.
    """
    c = config
    assert c["method"] == "m-arwp" and c["parallel_roles"] and c["schedule"] == "cosine" and not c["nesterov"]
    assert c["sigma_inc"] == 0.0 and not c["incstd"] and c["val_split"] == 0
    ds = load_dataset(c["data"])
    torch.manual_seed(c["seed"])
    model = build_model(c["model"], **c["model_kwargs"])
    model.train()
    w = [p.detach().clone() for p in model.parameters()]
    fisher = [torch.zeros(p.shape[0] if p.dim() > 1 else p.shape, dtype=p.dtype) for p in w]
    momentum_buf: list[Tensor | None] = [None] * len(w)
    rng = NoiseGenerators(c["seed"], stream=0)  # the one perturbed rank's stream
    train_idx, _ = split_validation(len(ds.train), 0, c["seed"])
    n, bs = train_idx.shape[0], c["batch_size"]
    per_epoch = math.ceil(n / bs)
    total = c["epochs"] * per_epoch
    lam, sigma, eta, beta = c["lam"], c["sigma"], c["eta"], c["beta"]
    clean_pos, pert_pos = (1, 0) if swap_roles else (0, 1)
    t = 0
    losses: list[float] = []
    for epoch in range(c["epochs"]):
        order = _epoch_order(n, c["seed"], epoch)
        loss_sum, count = 0.0, 0
        for b in range(per_epoch):
            idx = train_idx[order[b * bs : (b + 1) * bs]]
            x0, y0 = ds.train.x[idx[clean_pos::2]], ds.train.y[idx[clean_pos::2]]
            x1, y1 = ds.train.x[idx[pert_pos::2]], ds.train.y[idx[pert_pos::2]]
            rng.next_draw()
            gen = rng.get(torch.device("cpu"))
            w_eps = [torch.addcmul(p, torch.empty_like(p).normal_(generator=gen), _noise_std(p, f, sigma=sigma, eta=eta))
                     for p, f in zip(w, fisher)]
            g_clean, loss_clean = _grads(model, w, x0, y0)
            g_pert, loss_pert = _grads(model, w_eps, x1, y1)
            for i, gp in enumerate(g_pert):
                fisher[i] = fisher[i] * beta + row_sq_sums([gp])[0]
            lr = c["lr"] * 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
            for i in range(len(w)):
                d = (g_pert[i] * lam + g_clean[i] * (1.0 - lam)).add(w[i], alpha=c["weight_decay"])
                if momentum_buf[i] is None:
                    momentum_buf[i] = d.clone()
                else:
                    momentum_buf[i].mul_(c["momentum"]).add_(d)
                w[i] = w[i].add(momentum_buf[i], alpha=-lr)
            t += 1
            loss_sum += float(loss_clean) * y0.shape[0] + float(loss_pert) * y1.shape[0]
            count += y0.shape[0] + y1.shape[0]
        losses.append(loss_sum / count)
    names = [name for name, _ in model.named_parameters()]
    return dict(zip(names, w)), losses
