"""One call behind ``flatness hessian``: checkpoint in, JSON-ready result out.

The keys other tools rely on (DESIGN.md section 4): ``top_eigenvalues``
(descending), ``residuals``, ``error_bounds`` (eigenvalue error bounds),
``converged``, ``hvp_count``, ``trace`` (or ``None``), ``trace_stderr``,
``samples``, ``bn_mode``, ``seconds``, ``checkpoint``, ``version``;
``density`` is ``{"grid", "values", ...}`` when asked for and ``None``
otherwise; ``per_layer`` is ``[{"name", "numel", "top_eigenvalue", "trace",
...}]`` with ``--per-layer`` and ``None`` otherwise; ``spec`` holds every
setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flatness.analysis import Sources, prepare_analysis
from flatness.curvature.measure import measure_curvature
from flatness.curvature.spec import HessianSpec
from flatness.distributed import info as dist_info
from flatness.errors import FlatnessError
from flatness.losses import batch_size
from flatness.version import __version__

def hessian_report(
    checkpoint: str | Path,
    spec: HessianSpec,
    *,
    sources: Sources | None = None,
    device: torch.device | str = "cpu",
    on_hvp: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Top eigenvalues (and optionally trace, spectral density, per-layer blocks) of a checkpoint's loss Hessian.

    Loads ``checkpoint`` with :func:`flatness.analysis.prepare_analysis`
    (the first ``spec.samples`` of ``spec.split``, eval mode, the checkpoint's
    loss) and runs :func:`flatness.curvature.measure.measure_curvature` (one
    operator for every measure). Under ``torch.distributed`` (process group
    already initialized) the batches are split so that every rank gets
    some, and every rank returns the same result.

    Args:
        checkpoint: a flatness checkpoint, a run directory, or a foreign
            state_dict (with ``sources.model``).
        spec: what to measure (:class:`HessianSpec`).
        sources: the user's own model / data / loss (see
            :class:`flatness.analysis.Sources`); ``None``: the checkpoint's.
        device: where to compute.
        on_hvp: called with the running product count after every product.

    Returns:
        A JSON-ready dict (module docstring for the keys).

    Raises:
        FlatnessError: bad checkpoint or data, data other than the
            checkpoint's without ``allow_other_data``, ``top_k`` too large,
            or a loss that is not finite at the checkpoint.
    """
    analysis = prepare_analysis(checkpoint, split=spec.split, samples=spec.samples, batch_size=spec.batch_size, device=device, sources=sources)
    world = dist_info().world_size
    batches = _at_least(analysis.batches, world)
    try:
        measured = measure_curvature(analysis.model, analysis.loss_fn, batches, spec, on_hvp=on_hvp)
    except FlatnessError as e:
        raise FlatnessError(f"{checkpoint}: {e}") from None
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "model": analysis.checkpoint.model_name,
        "dataset": analysis.dataset,
        "loss_name": analysis.loss,
        "split": spec.split,
        "samples": analysis.samples,
        "dtype": spec.dtype,
        "backend": spec.backend,
        "device": str(device),
        "world_size": world,
    }
    result.update(measured.to_dict())
    result["version"] = __version__
    result["provenance"] = analysis.provenance
    return result


def _at_least(batches: list[Any], parts: int) -> list[Any]:
    """Split batches so there are at least ``parts`` of them (one per rank).

    The operator weights batches by size, so how the samples are cut does
    not change the Hessian (the model runs in eval mode).
    """
    if len(batches) >= parts:
        return batches
    whole = _cat(batches)
    n = batch_size(whole)
    size = math.ceil(n / parts)
    return [_slice(whole, i, i + size) for i in range(0, n, size)]


def _cat(batches: list[Any]) -> Any:
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, dict):
        return {k: _cat([b[k] for b in batches]) for k in first}
    return type(first)(_cat([b[i] for b in batches]) for i in range(len(first)))


def _slice(batch: Any, a: int, b: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[a:b]
    if isinstance(batch, dict):
        return {k: _slice(v, a, b) for k, v in batch.items()}
    return type(batch)(_slice(v, a, b) for v in batch)
