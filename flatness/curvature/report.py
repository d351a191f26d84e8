"""One call behind ``flatness hessian``: checkpoint in, JSON-ready result out.

The keys other tools rely on (DESIGN.md section 4): ``top_eigenvalues``
(descending), ``residuals``, ``converged``, ``hvp_count``, ``trace`` (or
``None``), ``trace_stderr``, ``samples``, ``bn_mode``, ``seconds``,
``checkpoint``, ``version``; ``density`` is ``{"grid", "values", ...}`` when
asked for and ``None`` otherwise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flatness.analysis import Sources, prepare_analysis
from flatness.curvature.density import slq_density
from flatness.curvature.lanczos import lanczos_top_eigs
from flatness.curvature.operator import HessianOperator
from flatness.curvature.trace import hutchinson_trace, hutchpp_trace
from flatness.distributed import info as dist_info
from flatness.errors import FlatnessError
from flatness.version import __version__

DTYPES = {"float32": torch.float32, "float64": torch.float64}
TRACE_METHODS = ("hutch++", "hutchinson")


def hessian_report(
    checkpoint: str | Path,
    *,
    top_k: int = 5,
    tol: float = 1e-6,
    max_iter: int = 500,
    trace: bool = False,
    trace_method: str = "hutch++",
    trace_matvecs: int = 99,
    density: bool = False,
    density_steps: int = 80,
    density_runs: int = 2,
    samples: int | None = None,
    split: str = "train",
    batch_size: int = 1000,
    dtype: str = "float32",
    backend: str = "graph",
    model: str | None = None,
    data: str | None = None,
    data_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    on_hvp: Callable[[int], None] | None = None,
    sources: Sources | None = None,
) -> dict[str, Any]:
    """Top eigenvalues (and optionally trace and spectral density) of a checkpoint's loss Hessian.

    Loads ``checkpoint`` with :func:`flatness.analysis.prepare_analysis`
    (the first ``samples`` of ``split``, eval mode, mean cross-entropy),
    builds one :class:`HessianOperator` and runs the estimators on it. Under
    ``torch.distributed`` (process group already initialized) the batches
    are split so that every rank gets some, and every rank returns the same
    result.

    Args:
        checkpoint: a flatness checkpoint or a foreign state_dict (``model``).
        top_k: eigenvalues wanted.
        tol: Lanczos relative residual tolerance.
        max_iter: most Hessian-vector products for the eigenvalues.
        trace: also estimate the trace.
        trace_method: ``"hutch++"`` or ``"hutchinson"``.
        trace_matvecs: products spent on the trace.
        density: also estimate the spectral density (SLQ).
        density_steps: Lanczos steps per SLQ run.
        density_runs: SLQ runs.
        samples: samples of the split (``None``: all).
        split: ``"train"`` or ``"test"``.
        batch_size: samples per batch (memory; the result does not depend on it).
        dtype: ``"float32"`` or ``"float64"``.
        backend: HVP backend (see :class:`HessianOperator`).
        model, data, data_dir: as for :func:`prepare_analysis`.
        device: where to compute.
        seed: seed of all random start vectors and probes.
        on_hvp: called with the running product count after every product.
        sources: the user's own model / data / loss (overrides ``model``,
            ``data``, ``data_dir``; see :class:`flatness.analysis.Sources`).

    Returns:
        A JSON-ready dict (module docstring for the keys).

    Raises:
        FlatnessError: bad checkpoint, data, dtype or option values, or a
            loss that is not finite at the checkpoint.
    """
    if dtype not in DTYPES:
        raise FlatnessError(f"unknown dtype {dtype!r}; expected 'float32' or 'float64'")
    if trace_method not in TRACE_METHODS:
        raise FlatnessError(f"unknown trace method {trace_method!r}; expected 'hutch++' or 'hutchinson'")
    if not tol > 0:
        raise FlatnessError(f"--tol must be positive, got {tol}")
    if trace and trace_matvecs < (4 if trace_method == "hutch++" else 2):
        raise FlatnessError(f"--trace-matvecs must be at least {4 if trace_method == 'hutch++' else 2} for {trace_method}, got {trace_matvecs}")
    analysis = prepare_analysis(
        checkpoint, model=model, data=data, data_dir=data_dir, split=split, samples=samples, batch_size=batch_size, device=device,
        sources=sources,
    )
    world = dist_info().world_size
    batches = _at_least(analysis.batches, world)

    start = time.perf_counter()
    H = HessianOperator(analysis.model, analysis.loss_fn, batches, dtype=DTYPES[dtype], backend=backend, callback=on_hvp)
    n = H.shape[0]
    if top_k > n:
        raise FlatnessError(f"--top-k {top_k} is more than the {n} parameters of the model")
    loss, grad = H.loss_and_gradient()
    if not bool(torch.isfinite(loss)):
        raise FlatnessError(f"the loss of {checkpoint} on {analysis.samples} {split} samples is {float(loss)}; its Hessian is not defined")
    eig = lanczos_top_eigs(H, top_k, tol, max_iter, seed=seed)
    counts = {"eigenvalues": eig.hvp_count, "trace": 0, "density": 0}
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "model": analysis.checkpoint.model_name,
        "dataset": analysis.dataset,
        "loss_name": analysis.loss,
        "split": split,
        "samples": analysis.samples,
        "num_params": n,
        "dtype": dtype,
        "backend": backend,
        "device": str(H.device),
        "world_size": world,
        "bn_mode": H.bn_mode,
        "loss": float(loss),
        "gradient_norm": float(torch.linalg.vector_norm(grad)),
        "top_k": top_k,
        "tol": tol,
        "top_eigenvalues": eig.eigenvalues.tolist(),
        "residuals": eig.residuals.tolist(),
        "converged": eig.converged,
        "restarts": eig.restarts,
        "trace": None,
        "trace_stderr": None,
        "trace_method": None,
        "density": None,
    }
    if trace:
        estimate = hutchpp_trace if trace_method == "hutch++" else hutchinson_trace
        tr = estimate(H, trace_matvecs, seed=seed)
        counts["trace"] = tr.hvp_count
        result.update(trace=tr.trace, trace_stderr=_finite_or_none(tr.stderr), trace_method=tr.method)
    if density:
        dens = slq_density(H, density_steps, density_runs, seed=seed)
        counts["density"] = dens.hvp_count
        result["density"] = dens.to_dict()
    result["hvp_count"] = H.hvp_count
    result["hvp_counts"] = counts
    result["seconds"] = time.perf_counter() - start
    result["version"] = __version__
    return result


def _at_least(batches: list[Any], parts: int) -> list[Any]:
    """Split batches so there are at least ``parts`` of them (one per rank).

    The operator weights batches by size, so how the samples are cut does
    not change the Hessian (the model runs in eval mode).
    """
    if len(batches) >= parts:
        return batches
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    size = math.ceil(len(y) / parts)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
