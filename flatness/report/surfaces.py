"""Filter-normalized random-direction surfaces for the report (Li et al. 2018).

Uses :mod:`flatness.landscape`: one (1D) or two (2D) seeded Gaussian
directions normalized per filter, bias and BN ignored, evaluated on the
report's samples. The same seed is used for every checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flatness.analysis import Analysis


def surface_for(a: Analysis, s: Any, device: torch.device | str) -> dict[str, Any]:
    """Loss / accuracy on a 1D line or 2D grid around the checkpoint (JSON-ready)."""
    from flatness.landscape.directions import model_weights, random_directions
    from flatness.landscape.evaluate import evaluate_points

    dim = 1 if s.surface == "1d" else 2
    center = [w.detach() for w in model_weights(a.model)]
    directions = random_directions(center, dim, seed=s.seed)
    xs = np.linspace(-s.surface_range, s.surface_range, s.surface_points)
    if dim == 1:
        coords = xs[:, None]
    else:
        gx, gy = np.meshgrid(xs, xs, indexing="ij")
        coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    values = evaluate_points(a.model, a.batches, center, directions, coords, loss_fn=a.loss_fn, method="auto").cpu()
    loss = values[:, 0].numpy()
    acc = values[:, 1].numpy()
    if dim == 2:
        loss = loss.reshape(len(xs), len(xs))
        acc = acc.reshape(len(xs), len(xs))
    return {"dim": dim, "x": xs.tolist(), "y": xs.tolist() if dim == 2 else None, "loss": loss.tolist(), "acc": acc.tolist()}
