"""flatness.landscape.directions and grid: normalization, ignore rules, seeding, interpolation, axis specs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flatness.errors import FlatnessError
from flatness.landscape.directions import (
    interpolation_directions,
    model_weights,
    normalize_direction,
    random_directions,
)
from flatness.landscape.grid import chunk_ranges, grid_points, parse_axis
from flatness.models import build_model


def _net() -> nn.Module:
    torch.manual_seed(0)
    return build_model("cnn1d", in_features=40, num_classes=10, batch_norm=True)


def test_filter_normalized_rows_have_the_weights_row_norms() -> None:
    w = model_weights(_net())
    (d,) = random_directions(w, 1, norm="filter", seed=3)
    checked = 0
    for di, wi in zip(d, w):
        if wi.ndim >= 2:
            torch.testing.assert_close(di.flatten(1).norm(dim=1), wi.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-7)
            checked += 1
        else:
            assert torch.count_nonzero(di) == 0  # biases and BN scales ignored by default
    assert checked == 4  # three convolutions and the classifier


def test_layer_and_model_norms() -> None:
    w = model_weights(_net())
    (d,) = random_directions(w, 1, norm="layer", seed=1)
    for di, wi in zip(d, w):
        if wi.ndim >= 2:
            torch.testing.assert_close(di.norm(), wi.norm(), rtol=1e-5, atol=0)
    (m,) = random_directions(w, 1, norm="model", seed=1)
    kept = [i for i, wi in enumerate(w) if wi.ndim >= 2]
    dn = torch.sqrt(sum(m[i].double().pow(2).sum() for i in kept))
    wn = torch.sqrt(sum(w[i].double().pow(2).sum() for i in kept))
    torch.testing.assert_close(dn, wn, rtol=1e-6, atol=0)


def test_ignore_none_keeps_one_dimensional_parameters_at_their_norm() -> None:
    w = model_weights(_net())
    (d,) = random_directions(w, 1, norm="filter", ignore="none", seed=0)
    one_d = [(di, wi) for di, wi in zip(d, w) if wi.ndim == 1]
    assert any(torch.count_nonzero(di) > 0 for di, _ in one_d)
    for di, wi in one_d:  # a zero tensor (a fresh BN shift) gets a zero direction
        torch.testing.assert_close(di.norm(), wi.norm(), rtol=1e-5, atol=1e-7)


def test_seeded_and_distinct() -> None:
    w = model_weights(_net())
    a = random_directions(w, 2, seed=5)
    b = random_directions(w, 2, seed=5)
    c = random_directions(w, 2, seed=6)
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x, y)
    assert not torch.equal(a[0][0], c[0][0])
    assert not torch.equal(a[0][0], a[1][0])  # x and y differ


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"norm": "row"}, "Unknown norm 'row'"),
        ({"ignore": "bias"}, "Unknown ignore 'bias'"),
    ],
)
def test_bad_names(kwargs: dict, message: str) -> None:
    w = [torch.ones(2, 3)]
    with pytest.raises(ValueError, match=message):
        normalize_direction([torch.ones(2, 3)], w, **kwargs)


def test_interpolation_reaches_the_targets() -> None:
    a, b = model_weights(_net()), [t + 1.0 for t in model_weights(_net())]
    (d,) = interpolation_directions(a, [b])
    for wa, wb, di in zip(a, b, d):
        torch.testing.assert_close(wa + di, wb)
    (z,) = interpolation_directions(a, [b], ignore="biasbn")
    assert all(torch.count_nonzero(t) == 0 for t, w in zip(z, a) if w.ndim == 1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("-1:1", "expects MIN:MAX:N"),
        ("-1:1:5:2", "expects MIN:MAX:N"),
        ("a:1:5", "expects numbers"),
        ("-1:1:2.5", "integer N"),
        ("-1:1:0", "positive integer, got 0"),
        ("-1:1:-3", "positive integer, got -3"),
        ("1:-1:5", "MIN must be smaller than MAX"),
        ("1:1:5", "MIN must be smaller than MAX"),
        ("-inf:1:5", "finite"),
    ],
)
def test_axis_errors(spec: str, message: str) -> None:
    with pytest.raises(FlatnessError, match=message):
        parse_axis(spec)


def test_axis_grid_and_chunks() -> None:
    xs = parse_axis("-1:1:3").coordinates
    ys = parse_axis("0:1:2").coordinates
    np.testing.assert_array_equal(xs, [-1, 0, 1])
    pts = grid_points(xs, ys)
    assert pts.shape == (6, 2)
    for p in range(6):  # flat index p is cell [p // nx, p % nx] of the (ny, nx) array: (x_{p % nx}, y_{p // nx})
        assert tuple(pts[p]) == (xs[p % 3], ys[p // 3])
    assert [list(r) for r in chunk_ranges(5, 2)] == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("tiny", [0.0, 1e-9])
def test_a_numerically_zero_filter_stays_zero(tiny: float) -> None:
    """A unit without gradient (zero or round-off row of a Hessian eigenvector) is not blown up to the weights' filter norm."""
    w = [torch.randn(4, 3, generator=torch.Generator().manual_seed(0)) + 1.0, torch.randn(5, 2) + 1.0]
    d = [torch.randn(4, 3), torch.randn(5, 2)]
    d[0][2] = tiny  # one dead unit
    d[1] = d[1] * tiny  # a whole tensor without gradient
    out = normalize_direction(d, w, norm="filter", ignore="none")
    assert float(out[0][2].norm()) == 0.0 and float(out[1].norm()) == 0.0
    live = [0, 1, 3]
    assert torch.allclose(out[0][live].norm(dim=1), w[0][live].norm(dim=1), rtol=1e-5)  # every live filter as before
    layer = normalize_direction(d, w, norm="layer", ignore="none")
    assert float(layer[1].norm()) == 0.0 and float(layer[0].norm()) == pytest.approx(float(w[0].norm()), rel=1e-5)


def test_hessian_direction_of_a_dead_unit_stays_zero() -> None:
    """The case of the issue: filter-normalized Hessian eigenvectors of a net with a dead ReLU unit."""
    from flatness.landscape.hessian_directions import hessian_directions

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        net[0].bias[3] = -100.0  # unit 3 never fires: no gradient, zero Hessian rows
    x, y = torch.randn(256, 10), torch.randint(0, 4, (256,))
    raw, _ = hessian_directions(net, nn.functional.cross_entropy, [(x, y)], 1)
    assert 0 < float(raw[0][0][3].norm()) < 1e-2 * float(raw[0][0].norm(dim=1).max())  # Lanczos accuracy, not exactly 0
    (d,), _ = hessian_directions(net, nn.functional.cross_entropy, [(x, y)], 1, normalize="filter")
    assert float(d[0][3].norm()) == 0.0 and float(d[0][0].norm()) == pytest.approx(float(net[0].weight[0].norm()), rel=1e-4)
