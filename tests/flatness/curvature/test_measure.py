"""``HessianSpec`` validation and ``measure_curvature``: every measure on one operator (one graph cache)."""

from __future__ import annotations

import re

import pytest
import torch

from flatness.curvature import HessianOperator, HessianSpec, hutchpp_trace, lanczos_top_eigs, measure_curvature, slq_density
from flatness.errors import FlatnessError
from flatness.losses import ModelLoss
from tests.flatness.curvature.problems import LOSS, problem

BAD = [
    (dict(top_k=0), "--top-k: expected a positive integer, got 0"),
    (dict(top_k=2.5), "--top-k: expected a positive integer, got 2.5"),
    (dict(tol=0.0), "--tol: expected a positive number, got 0.0"),
    (dict(tol=float("nan")), "--tol: expected a positive number, got nan"),
    (dict(tol=float("inf")), "--tol: expected a positive number, got inf"),
    (dict(top_k=5, max_iter=3), "--max-iter 3 cannot give 5 eigenvalues (Lanczos needs at least --top-k products); raise --max-iter"),
    (dict(trace_method="exact"), "unknown --trace-method 'exact'; expected one of 'hutch++', 'hutchinson'"),
    (dict(trace=True, trace_matvecs=3), "--trace-matvecs must be at least 4 for hutch++, got 3"),
    (dict(trace=True, trace_method="hutchinson", trace_matvecs=1), "--trace-matvecs must be at least 2 for hutchinson, got 1"),
    (dict(dtype="float16"), "unknown --dtype 'float16'; expected one of 'float32', 'float64'"),
    (dict(backend="hvp"), "unknown --backend 'hvp'"),
    (dict(split="validation"), "unknown --split 'validation'"),
    (dict(per_layer="row"), "unknown --per-layer 'row'; expected one of 'tensor', 'module'"),
    (dict(samples=0), "--samples: expected a positive integer, got 0"),
    (dict(batch_size=-1), "--batch-size: expected a positive integer, got -1"),
    (dict(density=True, density_points=1), "the density needs at least 2 grid points, got 1"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[re.sub(r"\W+", "_", m)[:30] for _, m in BAD])
def test_spec_is_validated_once_with_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(FlatnessError) as e:
        HessianSpec(**kwargs)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_top_k_must_be_at_most_the_number_of_parameters() -> None:
    p = problem("cnn1d")
    n = p.dense.shape[0]
    with pytest.raises(FlatnessError, match=f"--top-k {n + 1} is more than the {n} parameters"):
        measure_curvature(p.model, LOSS, p.batches, HessianSpec(top_k=n + 1, max_iter=2 * n + 2))


def test_top_k_equal_to_the_number_of_parameters_is_the_whole_spectrum() -> None:
    """Issue 23: ``--top-k 1`` was refused on a one-parameter model; top_k == n gives every eigenvalue."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Linear(1, 1, bias=False).double()
    batches = [(torch.randn(16, 1, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64))]
    r = measure_curvature(model, nn.functional.mse_loss, batches, HessianSpec(top_k=1, dtype="float64"))
    exact = 2 * float((batches[0][0] ** 2).mean())  # d2/dw2 of mean (w x - y)^2
    assert abs(float(r.eigen.eigenvalues[0]) - exact) < 1e-8 * exact


def test_one_operator_serves_every_measure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eigenvalues, trace, density and per-layer blocks: one graph cache, the same numbers as separate estimator calls."""
    p = problem("cnn1d_bn")
    builds = []
    original = HessianOperator._build_cache
    monkeypatch.setattr(HessianOperator, "_build_cache", lambda self: builds.append(1) or original(self))
    spec = HessianSpec(top_k=3, tol=1e-10, trace=True, trace_matvecs=30, density=True, density_steps=15, density_runs=1, density_points=200, per_layer="module", dtype="float64")
    r = measure_curvature(p.model, LOSS, p.batches, spec)
    assert len(builds) == 1
    monkeypatch.setattr(HessianOperator, "_build_cache", original)
    H = HessianOperator(p.model, LOSS, p.batches, dtype=torch.float64)
    assert torch.equal(r.eigen.eigenvalues, lanczos_top_eigs(H, 3, 1e-10, 500).eigenvalues)
    assert r.trace is not None and r.trace.trace == pytest.approx(hutchpp_trace(H, 30).trace, rel=1e-12)
    assert r.density is not None and torch.allclose(r.density.nodes, slq_density(H, 15, 1, num_points=200).nodes, rtol=1e-10)
    assert torch.allclose(r.eigen.eigenvalues, p.eigenvalues.flip(0)[:3], rtol=1e-9)
    d = r.to_dict()
    assert d["hvp_count"] == sum(d["hvp_counts"].values()) and d["hvp_counts"]["per_layer"] > 0
    assert len(d["error_bounds"]) == 3 and d["spec"]["top_k"] == 3 and d["bn_mode"] == "eval"
    assert [b["name"] for b in d["per_layer"]] == [f"features.{i}" for i in (0, 1, 3, 4, 6, 7)] + ["linear"]


def test_model_loss_and_non_finite_loss() -> None:
    p = problem("mlp")
    model_loss = ModelLoss(lambda model, batch: LOSS(model(batch[0]), batch[1]), "test:ce")
    r = measure_curvature(p.model, model_loss, p.batches, HessianSpec(top_k=2, tol=1e-10, dtype="float64"))
    assert torch.allclose(r.eigen.eigenvalues, p.eigenvalues.flip(0)[:2], rtol=1e-9)
    nan_loss = ModelLoss(lambda model, batch: LOSS(model(batch[0]), batch[1]) * float("nan"), "test:nan")
    with pytest.raises(FlatnessError, match="the loss is nan at this point"):
        measure_curvature(p.model, nan_loss, p.batches, HessianSpec(top_k=2))
