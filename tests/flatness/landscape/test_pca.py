"""PCA directions recover a known trajectory subspace; projections reconstruct the checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flatness.errors import FlatnessError
from flatness.landscape.directions import flatten
from flatness.landscape.pca import pca_directions, project_trajectory, run_checkpoints

SHAPES = [(6, 4), (6,), (3, 6, 2), (3,)]


def _unflatten(v: torch.Tensor) -> list[torch.Tensor]:
    out, i = [], 0
    for s in SHAPES:
        n = int(np.prod(s))
        out.append(v[i : i + n].reshape(s).float())
        i += n
    return out


def _trajectory(noise: float = 0.0) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dim = sum(int(np.prod(s)) for s in SHAPES)
    basis, _ = torch.linalg.qr(torch.randn(dim, 2, generator=g, dtype=torch.float64))
    center = torch.randn(dim, generator=g, dtype=torch.float64)
    t = torch.linspace(0, 1, 12, dtype=torch.float64)
    a, b = 3.0 * (1 - t) ** 2, 0.8 * torch.sin(torch.pi * t)  # a curved path ending at the centre
    traj = []
    for k in range(len(t)):
        v = center + a[k] * basis[:, 0] + b[k] * basis[:, 1] + noise * torch.randn(dim, generator=g, dtype=torch.float64)
        traj.append(_unflatten(v))
    return _unflatten(center), traj, basis


def test_pca_recovers_the_known_subspace() -> None:
    center, traj, basis = _trajectory()
    res = pca_directions(center, traj, n_components=2)
    D = torch.stack([flatten(d) for d in res.directions], 1)
    torch.testing.assert_close(D.T @ D, torch.eye(2, dtype=torch.float64), atol=1e-5, rtol=0)  # orthonormal
    # the principal plane is the plane of the path: both projections are identities
    s = torch.linalg.svdvals(basis.T @ D)
    assert float(s.min()) > 1 - 1e-5
    assert res.explained_variance_ratio.sum() == pytest.approx(1.0, abs=1e-6)
    assert res.explained_variance_ratio[0] > res.explained_variance_ratio[1] > 0
    coords = project_trajectory(center, traj, res.directions)
    for k, weights in enumerate(traj):  # checkpoints lie in the plane: exact reconstruction
        rebuilt = flatten(center) + coords[k, 0] * D[:, 0] + coords[k, 1] * D[:, 1]
        torch.testing.assert_close(rebuilt, flatten(weights), atol=1e-5, rtol=0)
    assert np.abs(coords[-1]).max() < 1e-5  # the last checkpoint is the centre


def test_pca_with_noise_and_biasbn_ignored() -> None:
    center, traj, basis = _trajectory(noise=1e-3)
    res = pca_directions(center, traj, n_components=2, ignore="biasbn")
    assert res.explained_variance_ratio.sum() > 0.99
    for d in res.directions:
        assert all(torch.count_nonzero(t) == 0 for t in d if t.ndim == 1)


def test_pca_needs_enough_distinct_points() -> None:
    center, traj, _ = _trajectory()
    with pytest.raises(FlatnessError, match="at least 3 distinct checkpoints"):
        pca_directions(center, [traj[0]], n_components=2)
    with pytest.raises(FlatnessError, match="at least one checkpoint"):
        pca_directions(center, [], n_components=2)


def test_run_checkpoints_order(tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "checkpoints").mkdir()
    for e in (10, 2, 1):
        (tmp_path / "checkpoints" / f"epoch_{e:04d}.pt").write_bytes(b"x")
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"x")
    assert [p.name for p in run_checkpoints(tmp_path)] == ["epoch_0001.pt", "epoch_0002.pt", "epoch_0010.pt"]
    with pytest.raises(FlatnessError, match="no checkpoints/epoch_XXXX.pt"):
        run_checkpoints(tmp_path / "checkpoints")
