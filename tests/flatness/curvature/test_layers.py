"""Per-layer curvature against the diagonal blocks of an independent dense Hessian (float64), and its bar chart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flatness.curvature import HessianOperator, LayerCurvature, per_layer_curvature
from flatness.curvature.layers import parameter_blocks
from flatness.errors import FlatnessError
from flatness.plots.per_layer import plot_per_layer
from tests.flatness.curvature.problems import LOSS, problem


@pytest.mark.parametrize("by", ["tensor", "module"])
def test_blocks_match_the_dense_diagonal_blocks(by: str) -> None:
    p = problem("cnn1d_bn")
    names = [k for k, q in p.model.named_parameters()]
    numels = [q.numel() for q in p.model.parameters()]
    layers = per_layer_curvature(p.model, LOSS, p.batches, by=by, tol=1e-12, trace_matvecs=10**6, dtype=torch.float64)
    blocks = parameter_blocks(names, numels, by)
    assert [b.name for b in layers] == [name for name, _, _ in blocks]
    assert sum(b.numel for b in layers) == p.dense.shape[0]
    for layer, (_, start, stop) in zip(layers, blocks):
        D = p.dense[start:stop, start:stop]
        top = float(torch.linalg.eigvalsh(D)[-1])
        assert layer.numel == stop - start
        assert layer.top_eigenvalue == pytest.approx(top, rel=1e-6, abs=1e-12)
        assert layer.trace == pytest.approx(float(D.trace()), rel=1e-6, abs=1e-12)
        assert layer.trace_stderr == 0.0


def test_module_blocks_group_weight_and_bias() -> None:
    blocks = parameter_blocks(["a.weight", "a.bias", "b.weight", "scale"], [6, 2, 4, 1], "module")
    assert blocks == [("a", 0, 8), ("b", 8, 12), ("", 12, 13)]
    with pytest.raises(ValueError, match="Unknown by 'row'"):
        parameter_blocks(["a"], [1], "row")


def test_large_blocks_use_hutchpp_and_share_the_operator() -> None:
    p = problem("mlp")
    H = HessianOperator(p.model, LOSS, p.batches, dtype=torch.float64)
    layers = per_layer_curvature(p.model, LOSS, p.batches, tol=1e-10, trace_matvecs=60, operator=H)
    big = [b for b in layers if b.numel > 60]
    assert big and all(b.trace_stderr > 0 for b in big)
    assert H.cached_batches == len(p.batches) and H.hvp_count == sum(b.hvp_count for b in layers)
    start = 0
    for b in big[:1]:
        start = sum(x.numel for x in layers[: layers.index(b)])
        exact = float(p.dense[start : start + b.numel, start : start + b.numel].trace())
        assert abs(b.trace - exact) <= 4 * b.trace_stderr + 1e-9


def test_bar_chart(tmp_path: Path) -> None:
    layers = [LayerCurvature(f"layer{i}.weight", 10 * i + 1, 10.0**i, 30.0 * i - 5.0, 0.0, 20) for i in range(4)]
    out = plot_per_layer(layers, tmp_path / "layers.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = plot_per_layer({"checkpoint": "a.pt", "per_layer": [b.to_dict() for b in layers]}, tmp_path / "layers.svg", log=False)
    assert out.read_bytes()[:5] == b"<?xml"
    with pytest.raises(FlatnessError, match="no per-layer curvature: run flatness hessian with --per-layer"):
        plot_per_layer({"per_layer": None}, tmp_path / "x.png")
    with pytest.raises(FlatnessError, match="must end in .png, .pdf or .svg"):
        plot_per_layer(layers, tmp_path / "x.jpg")
