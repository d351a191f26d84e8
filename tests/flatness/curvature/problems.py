"""Shared test problems: three tiny networks, fixed uneven batches, dense float64 Hessians.

The networks are small enough (a few hundred parameters) for an exact dense
Hessian in about a second, which every estimator is checked against. The
reference is independent of the project's code (:func:`reference_hessian`:
an explicit double-backward loop on the real module, one ``autograd.grad``
per row; no ``functional_call``, no operator, no ``dense_hessian``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flatness.models import build_model

LOSS = nn.functional.cross_entropy
SIZES = (30, 47, 23)  # uneven on purpose
MODELS = ("mlp", "cnn1d", "cnn1d_bn")


@dataclass
class Problem:
    name: str
    model: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    dense: Tensor  # float64 Hessian of the mean loss over all batches
    eigenvalues: Tensor  # ascending, float64


def make_model(name: str, seed: int = 0) -> nn.Module:
    """``mlp`` (826 parameters), ``cnn1d`` (338) or ``cnn1d_bn`` (362, BatchNorm with non-trivial statistics)."""
    torch.manual_seed(seed)
    if name == "mlp":
        model = build_model("mlp", in_features=40, num_classes=10, hidden=16, depth=1)
    elif name == "cnn1d":
        model = build_model("cnn1d", in_features=40, num_classes=10, channels=4)
    elif name == "cnn1d_bn":
        model = build_model("cnn1d", in_features=40, num_classes=10, channels=4, batch_norm=True)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.running_mean.normal_(0, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.normal_(1.0, 0.3)
                    m.bias.normal_(0, 0.3)
    else:
        raise ValueError(f"Unknown model {name!r}; expected 'mlp', 'cnn1d' or 'cnn1d_bn'")
    return model.eval()


def make_batches(seed: int = 1, sizes: tuple[int, ...] = SIZES) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, 40, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    x[y == 3] += 1.0  # some structure, so the Hessian is not pure noise
    out, start = [], 0
    for s in sizes:
        out.append((x[start : start + s], y[start : start + s]))
        start += s
    return out


@functools.cache
def problem(name: str) -> Problem:
    """Built once per test session (the dense Hessian is the slow part); treat as read-only."""
    model = make_model(name)
    batches = make_batches()
    dense = reference_hessian(model, LOSS, batches)
    return Problem(name, model, batches, dense, torch.linalg.eigvalsh(dense))


def _size(batch: Any) -> int:
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return int(first.shape[0])


def _batch_loss(model: nn.Module, loss_fn: Callable[..., Tensor], batch: Any) -> Tensor:
    if isinstance(batch, dict) or getattr(loss_fn, "name", None) is not None:  # a ModelLoss: fn(model, batch)
        return loss_fn(model, batch)
    return loss_fn(model(batch[0].double()), batch[1])


def reference_hessian(model: nn.Module, loss_fn: Callable[..., Tensor], batches: list) -> Tensor:
    """Dense float64 Hessian of the sample-weighted mean loss, row by row by double backward, in eval mode.

    Parameters as ``model.parameters()`` lists them (a tied tensor once),
    those with ``requires_grad`` only; entries the loss does not reach are 0.
    """
    model = copy.deepcopy(model).double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(_size(b) for b in batches)
    loss = sum(_batch_loss(model, loss_fn, b) * (_size(b) / total) for b in batches)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    g = torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1) for gi, p in zip(grads, params)])
    rows = []
    for i in range(g.numel()):
        if not g[i].requires_grad:  # the loss does not reach this entry
            rows.append(torch.zeros_like(g))
            continue
        row = torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if r is None else r).reshape(-1) for r, p in zip(row, params)]))
    H = torch.stack(rows)
    return 0.5 * (H + H.T)

