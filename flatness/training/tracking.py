r"""Curvature during training: lambda_max at chosen updates (``flatness train --track-curvature [N]``).

At a measured update the largest Hessian eigenvalue of the mean loss on a
fixed analysis batch (``track_samples`` training samples, model in eval
mode, as ``flatness hessian --samples`` measures it) is computed by Lanczos,
warm-started from the previous point's top eigenvector. Optionally the
trace (Hutch++). This is the measurement behind progressive sharpening and
the edge of stability (Cohen et al. 2021, "Gradient Descent on Neural
Networks Typically Occurs at the Edge of Stability"), where SGD's
:math:`\lambda_{\max}` hovers at :math:`2/\eta`.

Two ways to say how much to measure:

``every`` N updates, to full convergence (``--track-curvature N``)
    Lanczos to a relative eigenvalue error of :data:`TRACK_TOL` at every
    N-th update, as ``flatness hessian`` does; with ``products`` P > 0
    (``--track-products P``), at most P products per point instead.
a cost budget (``--track-curvature`` alone, or ``--track-budget B``)
    At most a fraction B of extra cost over untracked training. The first
    ``calibration`` updates are timed; the first point (cold start, tol
    :data:`BUDGET_TOL`) times a product and the operator's set-up; from
    these the tracker fixes, once, the interval N and the products per
    point P (default :data:`BUDGET_PRODUCTS`) so that the expected cost of
    the remaining points fits the budget over the run's updates:

    .. math::

        n = \Big\lfloor \frac{B\, U\, t_u - c_0}{t_b + P\, t_h} \Big\rfloor,
        \qquad N = \Big\lceil \frac{U - K}{n} \Big\rceil,

    with :math:`U` updates, :math:`t_u` the median time of a training
    update, :math:`c_0` the first point's cost, :math:`t_b` the operator's
    set-up (the gradient graph) and :math:`t_h` one Hessian-vector
    product; N > K is rounded up to a multiple of K. Later points fall on
    the multiples of N after the first one (at update K), so every point is
    also a point of ``--track-curvature K``.
    The plan is a decision taken once and stored in the checkpoint, so a
    resumed run measures at the same updates, with the same warm starts, as
    the uninterrupted run that took the same decision (timing is not
    reproducible; the stored decision is).

Why a few products suffice: the weights move little between points, so the
previous top eigenvector is close to the new one, and a few Lanczos steps
from it (at most P, stopping early at a relative :data:`BUDGET_TOL`) refine
it. The Ritz value :math:`\theta` with unit Ritz vector :math:`x` and
residual :math:`r = \|Hx - \theta x\|` has an eigenvalue within :math:`r`
(Parlett, *The Symmetric Eigenvalue Problem*, Thm 4.5.1): that is the
``error_bound`` of a budgeted or capped point. The tighter Kato-Temple
estimate :math:`r^2/\delta` (``ritz_bound``,
:func:`flatness.curvature.lanczos.error_bounds`) needs the gap
:math:`\delta` to the rest of the spectrum, which a few Lanczos steps
overestimate, so it is recorded but not claimed. Points at full convergence
(``--track-curvature N``) report the Lanczos bound, as ``flatness hessian``
does. A Ritz value never exceeds :math:`\lambda_{\max}`, so the tracked
value is also a lower bound; the residual bound is to the *nearest*
eigenvalue, which is the top one while the warm start still points at it
(with too few products in a phase where the top eigenvector turns fast, it
may not be: tests/flatness/test_tracking.py saw that with P = 3, not with
the default P = 5). Every row records its products (``hvp_count``),
``error_bound``, ``residual``, ``ritz_bound`` and ``converged``.

The first budgeted point has no warm start: it runs from one power step of
a random vector to :data:`COLD_TOL` (at most :data:`COLD_PRODUCTS`
products), since a few products from a random start find *an* eigenvalue,
not the top one (at :data:`BUDGET_TOL` a cold Lanczos stopped on the second
eigenvalue of the smoke test's MLP, 3 % below the top, with a residual of 1.4 %).
Its cost counts against the budget, so a run shorter than about
``1 / budget`` times one converged point gets that one point (and exceeds
the budget by it).

Cost, honestly: ``extra_fraction`` = time spent measuring / time spent on
everything else of the run (training updates, evaluation, checkpoints),
both on one clock (process CPU time on CPU, which is the thread time with
one thread; wall time with a synchronised device on CUDA); that is
(tracked - untracked) / untracked. ``benchmarks/track_overhead.py`` checks
it against two separate runs.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Relative eigenvalue tolerance of the tracked Lanczos runs (``--track-curvature N``: full convergence).
TRACK_TOL = 1e-6
TRACK_MAX_ITER = 300
TRACE_MATVECS = 30
#: Relative eigenvalue tolerance under a budget or a product cap (the bound reached is recorded per point).
BUDGET_TOL = 1e-3
#: Most products of a warm-started point under a budget (``--track-products`` overrides).
BUDGET_PRODUCTS = 5
#: Relative tolerance of a cold start (the first point under a budget or a product cap).
COLD_TOL = 1e-5
#: Most products of the first (cold-start) point under a budget.
COLD_PRODUCTS = 30
#: Most training updates timed before the first point under a budget.
CALIBRATION_UPDATES = 100
#: Keys of a ``curvature.jsonl`` row that hold times (they differ between two runs of the same settings).
TIME_KEYS = ("curvature_seconds", "extra_fraction", "plan")


def calibration_updates(total_updates: int) -> int:
    """Updates timed before the first budgeted point: a twentieth of the run, between 2 and :data:`CALIBRATION_UPDATES`.

    Not the very first updates: there the top of the spectrum is not yet separated and a cold start
    needs several times the products (the MNIST-1D CNN: 21-30 products at update 10, 5-10 after one epoch).
    """
    return max(1, min(CALIBRATION_UPDATES, max(2, total_updates // 20), total_updates))


def plan_interval(budget: float, total_updates: int, start: int, first_cost: float, point_cost: float, t_update: float,
                  min_every: int = 1) -> int:
    """Interval N between budgeted points after the first, or 0 when the budget has no room for another.

    ``budget * total_updates * t_update`` is the measuring time allowed;
    the first point (``first_cost``) is spent; each later point costs
    ``point_cost``. ``min_every`` is a floor on N (``--track-curvature N``
    with a budget).
    """
    left = budget * total_updates * t_update - first_cost
    remaining = total_updates - start
    if remaining <= 0 or point_cost <= 0 or left < point_cost:
        return 0
    n = int(left // point_cost)
    every = max(min_every, 1, math.ceil(remaining / n))
    if every > start > 0:  # onto the multiples of the first point's update: every point is also one of
        every = start * math.ceil(every / start)  # ``--track-curvature start``'s (benchmarks/track_overhead.py compares them)
    return every


@dataclass
class CurvatureTracker:
    """lambda_max (and optionally the trace) on a fixed batch, every ``every`` updates or within a ``budget``.

    Attributes:
        every: updates between measurements (0 under a budget: chosen by the plan;
            with a budget, a floor on the chosen interval).
        trace: also estimate the trace (Hutch++, :data:`TRACE_MATVECS` products).
        batch: the fixed analysis batch: ``(x, y)``, or any batch ``loss_fn`` takes.
        budget: most extra cost over untracked training (fraction; 0: no budget).
        products: most products per point (0: until :data:`TRACK_TOL`, or the budget's default).
        total_updates: the run's updates (the budget is spread over them).
        vector: the last top eigenvector (flat, over all parameters in
            ``model.parameters()`` order), the next warm start.
        rows: one dict per measured point (``curvature.jsonl``).
        seconds: measuring time so far (on :attr:`clock`).
        train_seconds: time of everything else so far (on :attr:`clock`).
        plan: the budget's decision (``start``, ``every``, ``products``, the times
            it was made from), ``None`` until the first point.
        timings: update times collected for the plan (until it is made).
    """

    every: int
    trace: bool
    batch: Any
    vector: Tensor | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    loss_fn: Any = F.cross_entropy  # ``(output, target)`` loss or a flatness.losses.ModelLoss
    budget: float = 0.0
    products: int = 0
    total_updates: int = 0
    train_seconds: float = 0.0
    plan: dict[str, Any] | None = None
    timings: list[float] = field(default_factory=list)
    cuda: bool = False
    _mark: float | None = None

    @classmethod
    def from_config(cls, config: Any, batch: Any, loss_fn: Any, total_updates: int, device: torch.device) -> CurvatureTracker:
        """The tracker a :class:`~flatness.training.config.TrainConfig` asks for."""
        return cls(config.track_curvature, config.track_trace, batch, loss_fn=loss_fn, budget=config.track_budget,
                   products=config.track_products, total_updates=total_updates, cuda=torch.device(device).type == "cuda")

    # ------------------------------------------------------------------ schedule
    @property
    def clock(self) -> str:
        return "wall (device synchronised)" if self.cuda else "process CPU"

    def _now(self, *, sync: bool = True) -> float:
        """The clock; on CUDA the queued kernels finish first (``sync``), so their time lands where it belongs."""
        if self.cuda:
            if sync:
                torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    @property
    def extra_fraction(self) -> float:
        """Measuring time over the time of everything else (same clock): (tracked - untracked) / untracked."""
        return self.seconds / max(self.train_seconds, 1e-12)

    def due(self, step: int) -> bool:
        """Whether update ``step`` is measured (a pure function of the settings and the stored plan)."""
        if self.budget <= 0:
            return self.every > 0 and step % self.every == 0
        if self.plan is None:
            return step >= calibration_updates(self.total_updates)
        n = int(self.plan["every"])
        return n > 0 and step > int(self.plan["start"]) and step % n == 0

    def after_update(self, step: int) -> bool:
        """Called once after every update: books the time since the last call as training; returns :meth:`due`."""
        # On CUDA only the updates timed for the plan wait for the device; the others are booked unsynchronised
        # (no host sync per update), which evens out over the run and is settled at every measured point.
        now = self._now(sync=self.budget > 0 and self.plan is None)
        if self._mark is not None:
            self.train_seconds += now - self._mark
            if self.plan is None:
                self.timings.append(now - self._mark)
        self._mark = now
        return self.due(step)

    # ------------------------------------------------------------------ measuring
    def measure(self, model: nn.Module, step: int) -> dict[str, Any]:
        """Measure at the current weights (after update ``step``); returns the new row."""
        from flatness.curvature.lanczos import lanczos_top_eigs
        from flatness.curvature.operator import HessianOperator

        t0 = self._now()
        if self._mark is not None:
            self.train_seconds += t0 - self._mark  # the device finishing the last update's work
        H = HessianOperator(model, self.loss_fn, [self.batch], distributed=False)
        v0 = self.vector.to(H.device, H.dtype) if self.vector is not None else None
        cap, tol = self._work(cold=v0 is None)
        first = 0
        if v0 is None and self.budget > 0 and self.plan is None:
            # The budget's first point: one power step from a random vector starts the basis (rich in the top
            # eigenvector); it runs to BUDGET_TOL (at most COLD_PRODUCTS), since a few products from a random
            # start find *an* eigenvalue, not the top one. Its cost counts against the budget.
            v = torch.randn(H.shape[0], generator=torch.Generator(device=H.device).manual_seed(step), dtype=H.dtype, device=H.device)
            v0, first = H @ v, 1
        t_start = self._now()
        res = lanczos_top_eigs(H, 1, tol, cap, v0=v0, seed=step, check_every=1 if tol > TRACK_TOL else None)
        t_lanczos = self._now()
        self.vector = res.eigenvectors[:, 0].detach().cpu().clone()
        row: dict[str, Any] = {
            "step": step,
            "lambda_max": float(res.eigenvalues[0]),
            "hvp_count": int(res.hvp_count) + first,
            # Full convergence: the Lanczos bound, as ``flatness hessian`` reports it. A budgeted or capped point:
            # the residual, which bounds the distance to the nearest eigenvalue rigorously; the Kato-Temple
            # estimate r^2/delta (``ritz_bound``) needs the gap to the rest of the spectrum, which a few Lanczos
            # steps overestimate (it missed by up to 20 % in tests/flatness/test_tracking.py's setting).
            "error_bound": float(res.error_bounds[0] if tol <= TRACK_TOL and res.converged else res.residuals[0]),
            "residual": float(res.residuals[0]),
            "ritz_bound": float(res.error_bounds[0]),
            "converged": bool(res.converged),
        }
        if self.trace:
            from flatness.curvature.trace import hutchpp_trace

            row["trace"] = float(hutchpp_trace(H, TRACE_MATVECS, seed=step).trace)
        t1 = self._now()
        row["curvature_seconds"] = t1 - t0
        self.seconds += t1 - t0
        if self.budget > 0 and self.plan is None:
            row["plan"] = self.plan = self._make_plan(step, t1 - t0, (t_lanczos - t_start) / res.hvp_count)
        row["extra_fraction"] = self.extra_fraction
        self.rows.append(row)
        self._mark = self._now()  # the measuring is not training time
        return row

    def _work(self, *, cold: bool) -> tuple[int, float]:
        """(most products, relative tolerance) of the next point."""
        if self.budget <= 0 and self.products <= 0:
            return TRACK_MAX_ITER, TRACK_TOL
        if cold:  # no warm start: at a loose tol Lanczos can stop on the second eigenvalue before the top one shows
            return max(COLD_PRODUCTS, self.products), COLD_TOL
        if self.plan is not None:
            return int(self.plan["products"]), BUDGET_TOL
        return self.products or BUDGET_PRODUCTS, BUDGET_TOL

    def _t_update(self, default: float) -> float:
        return statistics.median(self.timings) if self.timings else default

    def _make_plan(self, step: int, cost: float, t_product: float) -> dict[str, Any]:
        """Interval and products per point from the timed updates and the first point (see the module docstring).

        The cost of a later point: ``products`` products and the operator's set-up (the gradient graph,
        counted as one product more).
        """
        t_update = self._t_update(cost)
        per_point = self.products or BUDGET_PRODUCTS
        point_cost = t_product * (per_point + 1 + (TRACE_MATVECS if self.trace else 0))
        every = plan_interval(self.budget, self.total_updates, step, cost, point_cost, t_update, max(self.every, 1))
        self.timings = []
        return {"start": step, "every": every, "products": per_point, "budget": self.budget, "clock": self.clock,
                "t_update": t_update, "t_product": t_product, "first_cost": cost, "point_cost": point_cost,
                "total_updates": self.total_updates}

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"vector": self.vector, "rows": list(self.rows), "seconds": self.seconds, "train_seconds": self.train_seconds,
                "plan": dict(self.plan) if self.plan is not None else None, "timings": list(self.timings)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vector = state["vector"]
        self.rows = list(state["rows"])
        self.seconds = float(state["seconds"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.plan = dict(state["plan"]) if state.get("plan") is not None else None
        self.timings = list(state.get("timings", []))
        self._mark = None  # the time between the checkpoint and this process's first update is not training
