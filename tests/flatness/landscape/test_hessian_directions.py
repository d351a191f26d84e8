"""Surfaces along the Hessian's top eigenvectors: the curvature they show is lambda_max."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from flatness.errors import FlatnessError
from flatness.landscape import SurfaceSpec, hessian_directions, loss_surface
from flatness.landscape.directions import flatten


def _tiny() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)) for n in (20, 13)]
    return net, batches


def _dense_hessian(net: nn.Module, batches: list) -> torch.Tensor:
    """Independent reference: torch.func.hessian of the sample-mean loss over one flat parameter vector."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    total = sum(len(y) for _, y in batches)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            n = int(np.prod(shape))
            params[name] = flat[offset : offset + n].view(shape)
            offset += n
        return sum(nn.functional.cross_entropy(functional_call(net, params, (x,)), y) * len(y) for x, y in batches) / total

    return torch.func.hessian(loss)(flat0)


def test_second_difference_along_the_top_eigenvector_is_lambda_max() -> None:
    net, batches = _tiny()
    lam = float(torch.linalg.eigvalsh(_dense_hessian(net, batches))[-1])
    h = 1e-3
    s = loss_surface(net, batches, SurfaceSpec(x=f"{-h}:{h}:3", directions="hessian"))
    f = s["train_loss"]
    second = (f[2] - 2 * f[1] + f[0]) / h**2
    assert second == pytest.approx(lam, rel=1e-3)
    assert s.settings["hessian_eigenvalues"][0] == pytest.approx(lam, rel=1e-8)
    v = torch.cat([torch.as_tensor(d).reshape(-1) for d in s.directions[0]])
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-10)  # unit eigenvector


def test_two_directions_are_the_top_two_eigenvectors() -> None:
    net, batches = _tiny()
    H = _dense_hessian(net, batches)
    evals, evecs = torch.linalg.eigh(H)
    dirs, values = hessian_directions(net, nn.functional.cross_entropy, batches, 2)
    assert values == pytest.approx([float(evals[-1]), float(evals[-2])], rel=1e-8)
    for d, k in zip(dirs, (-1, -2)):
        assert abs(float(flatten(d) @ evecs[:, k])) == pytest.approx(1.0, abs=1e-6)
    v1, v2 = flatten(dirs[0]), flatten(dirs[1])
    assert abs(float(v1 @ v2)) < 1e-6


def test_filter_normalized_hessian_directions_and_spec_checks() -> None:
    net, batches = _tiny()
    (d,), _ = hessian_directions(net, nn.functional.cross_entropy, batches, 1, normalize="filter")
    w = list(net.parameters())[0].detach()
    assert torch.allclose(d[0].norm(dim=1), w.norm(dim=1))  # each filter scaled to the weight filter's norm
    with pytest.raises(FlatnessError, match="--hessian-normalize is only used with --directions hessian"):
        SurfaceSpec(x="-1:1:3", hessian_normalize="filter")
    with pytest.raises(FlatnessError, match="unknown --hessian-normalize 'layer'"):
        SurfaceSpec(x="-1:1:3", directions="hessian", hessian_normalize="layer")


def test_a_hessian_surface_resumes_with_its_own_directions(tmp_path) -> None:  # noqa: ANN001
    from flatness.landscape import SurfaceFile, read_surface

    net, batches = _tiny()
    spec = SurfaceSpec(x="-1:1:7", directions="hessian", chunk_size=2)
    full = loss_surface(net, batches, spec)
    out = tmp_path / "h.h5"

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loss_surface(net, batches, spec, output=SurfaceFile(out), callback=stop)
    assert np.isnan(read_surface(out)["train_loss"]).sum() == 5
    s = loss_surface(net, batches, spec, output=SurfaceFile(out, resume=True))
    np.testing.assert_allclose(s["train_loss"], full["train_loss"], rtol=0, atol=1e-12)
    assert read_surface(out).settings["hessian_eigenvalues"] == full.settings["hessian_eigenvalues"]
