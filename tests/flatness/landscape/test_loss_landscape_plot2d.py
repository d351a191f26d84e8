"""loss-landscape's own ``plot_2D`` reads our files right (square and non-square grids).

``_ll_plot_2d_contour`` re-implements the reading code of
tomgoldstein/loss-landscape ``plot_2D.py::plot_2d_contour`` faithfully
(h5py, ``np.meshgrid(x, y)``, ``contour(X, Y, Z)``, ``contourf``, the 3-D
``plot_surface``) on a headless Figure. The value it draws at a known
``(x, y)`` must equal a loss recomputed from the directions stored in the
same file, with plain torch code.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from flatness.landscape import SurfaceFile, SurfaceSpec, loss_surface


def _ll_plot_2d_contour(surf_file: Path, surf_name: str = "train_loss", vmin: float = 0.1, vmax: float = 10, vlevel: float = 0.5):
    """plot_2D.py::plot_2d_contour as loss-landscape writes it (pyplot swapped for a Figure)."""
    from matplotlib.figure import Figure

    f = h5py.File(surf_file, "r")
    x = np.array(f["xcoordinates"][:])
    y = np.array(f["ycoordinates"][:])
    X, Y = np.meshgrid(x, y)
    if surf_name in f.keys():
        Z = np.array(f[surf_name][:])
    elif surf_name == "train_err" or surf_name == "test_err":
        Z = 100 - np.array(f[surf_name][:])
    f.close()
    fig = Figure()
    ax = fig.add_subplot()
    CS = ax.contour(X, Y, Z, cmap="summer", levels=np.arange(vmin, vmax, vlevel))
    ax.clabel(CS, inline=1, fontsize=8)
    fig2 = Figure()
    fig2.add_subplot().contourf(X, Y, Z, cmap="summer", levels=np.arange(vmin, vmax, vlevel))
    fig3 = Figure()
    fig3.add_subplot(projection="3d").plot_surface(X, Y, Z, linewidth=0, antialiased=False)
    return X, Y, Z


def _recomputed_loss(net: nn.Module, path: Path, x: float, y: float, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Loss at centre + x * xdirection + y * ydirection, directions read from the file."""
    with h5py.File(path, "r") as f:
        dx = [torch.as_tensor(f["xdirection"][str(k)][()]) for k in range(len(f["xdirection"]))]
        dy = [torch.as_tensor(f["ydirection"][str(k)][()]) for k in range(len(f["ydirection"]))]
    moved = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        for p, w, a, b in zip(moved.parameters(), net.parameters(), dx, dy):
            p.copy_(w + x * a + y * b)
        return float(nn.functional.cross_entropy(moved(data[0]), data[1]))


@pytest.mark.parametrize(("nx", "ny"), [(7, 7), (7, 5), (4, 9)])
def test_loss_landscape_plot_2d_draws_our_values_where_they_belong(tmp_path: Path, nx: int, ny: int) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(64, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g))
    out = tmp_path / "s.h5"
    loss_surface(net, [data], SurfaceSpec(x=f"-1:1:{nx}", y=f"-0.5:1.5:{ny}"), output=SurfaceFile(out))
    X, Y, Z = _ll_plot_2d_contour(out)  # raises on a (nx, ny) array when nx != ny
    assert Z.shape == X.shape == (ny, nx)
    for x, y in ((-1.0, 1.5), (1.0, -0.5), (float(X[0, 1]), float(Y[-2, 0]))):  # corners that a transposition swaps
        j, i = np.argwhere((X == x) & (Y == y))[0]
        assert Z[j, i] == pytest.approx(_recomputed_loss(net, out, x, y, data), abs=1e-10)
    # and the two opposite corners differ, so a transposed read would be caught
    assert abs(Z[-1, 0] - Z[0, -1]) > 1e-3
