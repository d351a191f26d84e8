r"""Curvature during training: lambda_max every N updates (``flatness train --track-curvature N``).

At every N-th update the largest Hessian eigenvalue of the mean
cross-entropy on a fixed analysis batch (the first ``track_samples``
training samples, model in eval mode, as ``flatness hessian --samples``
measures it) is computed by Lanczos, warm-started from the previous point's
top eigenvector: the weights move little between points, so the previous
vector is close to the new one and a few products suffice. Optionally the
trace (Hutch++). This is the measurement behind progressive sharpening and
the edge of stability (Cohen et al. 2021, "Gradient Descent on Neural
Networks Typically Occurs at the Edge of Stability"), where SGD's
:math:`\lambda_{\max}` hovers at :math:`2/\eta`.

The warm-start vector and the rows measured so far live in the checkpoint,
so a resumed run measures exactly what an uninterrupted one does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Relative eigenvalue tolerance of the tracked Lanczos runs.
TRACK_TOL = 1e-6
TRACK_MAX_ITER = 300
TRACE_MATVECS = 30


@dataclass
class CurvatureTracker:
    """lambda_max (and optionally the trace) on a fixed batch every ``every`` updates.

    Attributes:
        every: updates between measurements.
        trace: also estimate the trace (Hutch++, :data:`TRACE_MATVECS` products).
        batch: the fixed analysis batch: ``(x, y)``, or any batch ``loss_fn`` takes.
        vector: the last top eigenvector (flat, over all parameters in
            ``model.parameters()`` order), the next warm start.
        rows: one dict per measured point (``curvature.jsonl``).
        seconds: total measuring time so far.
    """

    every: int
    trace: bool
    batch: Any
    vector: Tensor | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    loss_fn: Any = F.cross_entropy  # ``(output, target)`` loss or a flatness.losses.ModelLoss

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def measure(self, model: nn.Module, step: int) -> dict[str, Any]:
        """Measure at the current weights (after update ``step``); returns the new row."""
        from flatness.curvature.lanczos import lanczos_top_eigs
        from flatness.curvature.operator import HessianOperator

        t0 = time.perf_counter()
        H = HessianOperator(model, self.loss_fn, [self.batch], distributed=False)
        v0 = self.vector.to(H.device, H.dtype) if self.vector is not None else None
        res = lanczos_top_eigs(H, 1, TRACK_TOL, TRACK_MAX_ITER, v0=v0, seed=step)
        self.vector = res.eigenvectors[:, 0].detach().cpu().clone()
        row: dict[str, Any] = {"step": step, "lambda_max": float(res.eigenvalues[0]), "hvp_count": int(res.hvp_count)}
        if self.trace:
            from flatness.curvature.trace import hutchpp_trace

            row["trace"] = float(hutchpp_trace(H, TRACE_MATVECS, seed=step).trace)
        row["curvature_seconds"] = time.perf_counter() - t0
        self.seconds += row["curvature_seconds"]
        self.rows.append(row)
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"vector": self.vector, "rows": list(self.rows), "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vector = state["vector"]
        self.rows = list(state["rows"])
        self.seconds = float(state["seconds"])
