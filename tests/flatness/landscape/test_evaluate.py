"""Batched surface evaluation against the plain per-point loop (float64), BN handling, model untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flatness.landscape import SurfaceSpec, evaluate_points, evaluate_points_reference, loss_surface, model_weights, random_directions
from flatness.landscape.grid import grid_points
from flatness.models import build_model


def _setup(batch_norm: bool) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    net = build_model("cnn1d", in_features=40, num_classes=10, channels=6, batch_norm=batch_norm).double()
    if batch_norm:  # non-trivial running statistics, as after training
        net.train()
        with torch.no_grad():
            for _ in range(3):
                net(torch.randn(32, 40, dtype=torch.float64) * 2 + 0.5)
    net.eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 40, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)) for n in (24, 24, 13)]
    return net, batches


@pytest.mark.parametrize("method", ["loop", "vmap"])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_surface_equals_per_point_reference(method: str, batch_norm: bool) -> None:
    net, batches = _setup(batch_norm)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    center = model_weights(net)
    dirs = random_directions(center, 2, seed=0)
    xs, ys = np.linspace(-1, 1, 5), np.linspace(-0.5, 1.5, 4)
    pts = grid_points(xs, ys)
    ours = evaluate_points(net, batches, center, dirs, pts, method=method).numpy()
    ref = evaluate_points_reference(net, batches, center, dirs, pts)
    assert np.abs(ours - ref).max() <= 1e-6
    assert not np.allclose(ref[:, 0], ref[0, 0])  # the surface is not flat: the test means something
    for k, v in net.state_dict().items():  # weights and BN running stats untouched
        assert torch.equal(v, before[k]), k


def test_loss_surface_matches_reference_through_the_public_api() -> None:
    net, batches = _setup(True)
    s = loss_surface(net, batches, SurfaceSpec(x="-1:1:4", y="-1:1:3", seed=2, chunk_size=5))
    pts = grid_points(s.xcoordinates, s.ycoordinates)
    dirs = [[torch.as_tensor(a) for a in d] for d in s.directions]
    ref = evaluate_points_reference(net, batches, model_weights(net), dirs, pts)
    assert np.abs(s["train_loss"].reshape(-1) - ref[:, 0]).max() <= 1e-6
    assert np.abs(s["train_acc"].reshape(-1) - ref[:, 1]).max() <= 1e-6
    i, j = 1, 2  # [j, i] is the value at (x_i, y_j)
    one = evaluate_points_reference(net, batches, model_weights(net), dirs, np.array([[s.xcoordinates[i], s.ycoordinates[j]]]))
    assert s["train_loss"].shape == (3, 4)
    assert abs(s["train_loss"][j, i] - one[0, 0]) <= 1e-6


def test_training_flag_is_restored_and_centre_is_the_plain_loss() -> None:
    net, batches = _setup(True)
    net.train()
    center = model_weights(net)
    dirs = random_directions(center, 1, seed=0)
    out = evaluate_points(net, batches, center, dirs, np.zeros((1, 1)))
    assert net.training
    net.eval()
    with torch.no_grad():
        n = sum(len(y) for _, y in batches)
        loss = sum(nn.functional.cross_entropy(net(x), y).item() * len(y) for x, y in batches) / n
    assert abs(float(out[0, 0]) - loss) <= 1e-12


def test_1d_surface_and_test_split() -> None:
    net, batches = _setup(False)
    s = loss_surface(net, batches[:2], SurfaceSpec(x="-1:1:7", test=True), test_batches=batches[2:])
    assert s.dim == 1 and set(s.values) == {"train_loss", "train_acc", "test_loss", "test_acc"}
    assert s["test_loss"].shape == (7,)
    assert np.all((s["train_acc"] >= 0) & (s["train_acc"] <= 100))


class _Branchy(nn.Module):
    """Data-dependent Python control flow: cannot run under vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        return out if float(out.sum()) > -1e9 else -out


def test_models_that_cannot_be_vmapped_fall_back_or_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    import flatness.landscape.surface as surface_mod
    from flatness.errors import FlatnessError
    from flatness.landscape import SurfaceFallbackWarning
    from flatness.landscape.evaluate import auto_chunk_size, vmap_failure

    net = _Branchy()
    batches = [(torch.randn(8, 40), torch.randint(0, 10, (8,)))]
    center = model_weights(net)
    dirs = random_directions(center, 1, seed=0)
    assert vmap_failure(net, batches, center, dirs).startswith("vmap: ")
    good, good_batches = _setup(False)
    assert vmap_failure(good, good_batches, model_weights(good), random_directions(model_weights(good), 1)) is None
    with pytest.raises(FlatnessError, match="cannot be evaluated with torch.func.vmap"):
        loss_surface(net, batches, SurfaceSpec(x="-1:1:3", method="vmap"))
    s = loss_surface(net, batches, SurfaceSpec(x="-1:1:3", method="auto"))  # CPU: the loop, no warning needed
    assert not np.isnan(s["train_loss"]).any()
    # where auto picks vmap (CUDA), an unbatchable model falls back to the loop once, with a warning
    monkeypatch.setattr(surface_mod, "resolve_method", lambda method, device, loss_fn=None: "vmap" if method != "loop" else "loop")
    with pytest.warns(SurfaceFallbackWarning, match=r"cannot be evaluated with torch.func.vmap \(vmap: "):
        s = loss_surface(net, batches, SurfaceSpec(x="-1:1:3", method="auto"))
    assert not np.isnan(s["train_loss"]).any()
    assert auto_chunk_size(net, batches, "loop") == 256  # 8 samples: the cap
    assert auto_chunk_size(net, [(torch.zeros(1000, 40), torch.zeros(1000))], "loop") == 65
    assert 1 <= auto_chunk_size(*_setup(False), "vmap") <= 64
    assert auto_chunk_size(*_setup(False), "vmap", budget_bytes=1) == 1


class _Buggy(nn.Module):
    """A model with a real bug: no fallback may hide it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x[:, :39])  # wrong shape: a RuntimeError that is not vmap's


def test_a_bug_in_the_model_is_not_swallowed_by_the_vmap_probe() -> None:
    from flatness.landscape.evaluate import vmap_failure

    net = _Buggy()
    batches = [(torch.randn(8, 40), torch.randint(0, 10, (8,)))]
    with pytest.raises(RuntimeError, match="size"):
        vmap_failure(net, batches, model_weights(net), random_directions(model_weights(net), 1))


def test_model_loss_surface_equals_reference_and_has_no_accuracy() -> None:
    from flatness.losses import ModelLoss

    net, batches = _setup(False)
    dict_batches = [{"inputs": x, "targets": y} for x, y in batches]
    loss = ModelLoss(lambda m, b: nn.functional.cross_entropy(m(b["inputs"]), b["targets"]), "tests:ce")
    s = loss_surface(net, dict_batches, SurfaceSpec(x="-1:1:3", y="-1:1:4", chunk_size=5), loss_fn=loss)
    ref = evaluate_points_reference(net, batches, model_weights(net), [[torch.as_tensor(a) for a in d] for d in s.directions],
                                    grid_points(s.xcoordinates, s.ycoordinates))
    assert np.abs(s["train_loss"].reshape(-1) - ref[:, 0]).max() <= 1e-9
    assert np.isnan(s["train_acc"]).all()
    assert s.settings["loss"] == "tests:ce"


def test_spec_validation_is_one_line_per_mistake() -> None:
    from flatness.errors import FlatnessError

    table = [
        ({"x": "-1:1"}, r"--x expects MIN:MAX:N"),
        ({"x": "-inf:1:3"}, r"--x -inf:1:3: grid bounds must be finite numbers"),
        ({"x": "-1:1:3", "dim": 2}, r"--dim 2 needs --y"),
        ({"x": "-1:1:3", "y": "0:1:3", "dim": 1}, r"--y is only used with --dim 2"),
        ({"x": "-1:1:3", "directions": "random"}, r"unknown --directions 'random'"),
        ({"x": "-1:1:3", "directions": "interp"}, r"needs one checkpoint"),
        ({"x": "-1:1:3", "to": ("a.pt",)}, r"--to is only used with --directions interp"),
        ({"x": "-1:1:3", "ignore": "bn"}, r"unknown --ignore 'bn'"),
        ({"x": "-1:1:3", "method": "fast"}, r"unknown --eval-mode 'fast'"),
        ({"x": "-1:1:3", "samples": 0}, r"--samples must be a positive integer, got 0"),
        ({"x": "-1:1:3", "chunk_size": -2}, r"--chunk-size must be a positive integer, got -2"),
        ({"x": "-1:1:3", "split": "validation"}, r"unknown --split 'validation'"),
    ]
    for kwargs, message in table:
        with pytest.raises(FlatnessError, match=message) as e:
            SurfaceSpec(**kwargs)
        assert "\n" not in str(e.value)
    spec = SurfaceSpec(x="-1:1:3", split="test", test=True)
    assert spec.test is False and spec.ignore == "biasbn"
    assert SurfaceSpec(x="-1:1:3", directions="hessian").ignore == "none"
    assert SurfaceSpec(x=(-1, 1, 3), y="0:1:2").to_dict()["y"] == "0:1:2"


def test_micro_batches_give_the_same_values() -> None:
    from flatness.landscape.evaluate import micro_batch_size

    net, batches = _setup(True)
    center = model_weights(net)
    dirs = random_directions(center, 2, seed=0)
    pts = grid_points(np.linspace(-1, 1, 3), np.linspace(-1, 1, 2))
    whole = evaluate_points(net, batches, center, dirs, pts, micro_batch=10**6).numpy()
    cut = evaluate_points(net, batches, center, dirs, pts, micro_batch=5).numpy()  # 24 -> 5+5+5+5+4, 13 -> 5+5+3
    ref = evaluate_points_reference(net, batches, center, dirs, pts)
    assert np.abs(cut - ref).max() <= 1e-10 and np.abs(whole - ref).max() <= 1e-10
    # a function of the shapes only: 1 MiB over the largest activation of one sample (6 channels x 19 x float64)
    assert micro_batch_size(net, batches) == (1 << 20) // (6 * 19 * 8)
