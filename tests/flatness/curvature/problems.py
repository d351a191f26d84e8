"""Shared test problems: three tiny networks, fixed uneven batches, dense float64 Hessians.

The networks are small enough (a few hundred parameters) for an exact dense
Hessian from ``torch.func`` in about a second, which every estimator is
checked against.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatness.curvature import dense_hessian
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
    dense = dense_hessian(model, LOSS, batches)
    dense = 0.5 * (dense + dense.T)
    return Problem(name, model, batches, dense, torch.linalg.eigvalsh(dense))

