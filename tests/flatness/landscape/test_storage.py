"""Surface files: our "xy" layout (and older "ij" files), loss-landscape's own files, resume rules, the lock."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from flatness.errors import FlatnessError
from flatness.landscape import SurfaceFile, SurfaceSpec, loss_surface, read_surface


def _f(x: float, y: float) -> float:
    return 1.0 + x + 10.0 * y  # every cell distinct, so any transposition shows


def _ll_file(path: Path, nx: int, ny: int, done: int) -> None:
    """A 2-D file as loss-landscape's plot_surface.py writes it (first ``done`` jobs computed).

    Replicates ``setup_surface_file`` + ``crunch`` + ``scheduler.get_unplotted_indices``:
    arrays allocated with shape (nx, ny) and filled with -1, flat index ``ind``
    of the job list taken from ``np.meshgrid(x, y)`` raveled.
    """
    xs, ys = np.linspace(-1, 1, nx), np.linspace(0, 2, ny)
    losses = -np.ones(shape=(len(xs), len(ys)))
    accs = -np.ones(shape=(len(xs), len(ys)))
    inds = np.array(range(losses.size))[losses.ravel() <= 0]
    xm, ym = np.meshgrid(xs, ys)
    coords = np.c_[xm.ravel()[inds], ym.ravel()[inds]]
    for count, ind in enumerate(inds[:done]):
        losses.ravel()[ind] = _f(*coords[count])
        accs.ravel()[ind] = 50.0 + coords[count][0]
    with h5py.File(path, "w") as f:
        f["dir_file"] = "model.t7_weights_xignore=biasbn_xnorm=filter.h5"
        f["xcoordinates"] = xs
        f["ycoordinates"] = ys
        f["train_loss"] = losses
        f["train_acc"] = accs


@pytest.mark.parametrize(("nx", "ny"), [(4, 3), (3, 5), (4, 4)])
def test_reads_loss_landscape_2d_files(tmp_path: Path, nx: int, ny: int) -> None:
    path = tmp_path / "ll.h5"
    done = nx * ny - 2
    _ll_file(path, nx, ny, done)
    s = read_surface(path)
    assert s.source == "loss-landscape" and s.dim == 2 and s["train_loss"].shape == (ny, nx)
    # their job order is meshgrid order: the last two jobs are (x_{nx-2}, y_last) and (x_{nx-1}, y_last)
    for i, x in enumerate(s.xcoordinates):
        for j, y in enumerate(s.ycoordinates):
            if j == ny - 1 and i >= nx - 2:
                assert np.isnan(s["train_loss"][j, i]) and np.isnan(s["train_acc"][j, i])
            else:
                assert s["train_loss"][j, i] == pytest.approx(_f(x, y))
                assert s["train_acc"][j, i] == pytest.approx(50.0 + x)


def test_reads_loss_landscape_1d_files(tmp_path: Path) -> None:
    path = tmp_path / "ll1.h5"
    xs = np.linspace(-1, 1, 5)
    loss = np.array([3.0, 2.0, 1.0, -1.0, -1.0])
    with h5py.File(path, "w") as f:
        f["xcoordinates"] = xs
        f["train_loss"] = loss
        f["train_acc"] = np.array([10.0, 20.0, 30.0, -1.0, -1.0])
    s = read_surface(path)
    assert s.dim == 1
    np.testing.assert_array_equal(s["train_loss"][:3], [3.0, 2.0, 1.0])
    assert np.isnan(s["train_loss"][3:]).all()


def test_our_layout_is_xy_with_directions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    out = tmp_path / "s.h5"
    s = loss_surface(net, data, SurfaceSpec(x="-1:1:4", y="0:1:3"), output=SurfaceFile(out))
    with h5py.File(out, "r") as f:
        assert f.attrs["index_order"] == "xy"
        assert f["train_loss"].shape == (3, 4)
        assert f["xcoordinates"].shape == (4,) and f["ycoordinates"].shape == (3,)
        assert sorted(f["xdirection"].keys(), key=int) == ["0", "1", "2", "3"]
        for k, p in enumerate(net.parameters()):
            assert f["xdirection"][str(k)].shape == tuple(p.shape)
            assert f["ydirection"][str(k)].shape == tuple(p.shape)
    back = read_surface(out)
    np.testing.assert_array_equal(back["train_loss"], s["train_loss"])
    assert back.settings["x"] == "-1:1:4" and back.settings["seed"] == 0


class _Stop(Exception):
    pass


def _interrupt_after(chunks: int):  # noqa: ANN202
    def callback(done: int, total: int) -> None:
        callback.calls += 1  # type: ignore[attr-defined]
        if callback.calls >= chunks:  # type: ignore[attr-defined]
            raise _Stop

    callback.calls = 0  # type: ignore[attr-defined]
    return callback


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    spec = SurfaceSpec(x="-1:1:5", y="-1:1:4", chunk_size=3)
    full = loss_surface(net, data, spec, output=SurfaceFile(tmp_path / "full.h5"))
    part = tmp_path / "part.h5"
    with pytest.raises(_Stop):
        loss_surface(net, data, spec, output=SurfaceFile(part), callback=_interrupt_after(2))
    mid = read_surface(part)
    assert np.isnan(mid["train_loss"]).sum() == 20 - 6
    with pytest.raises(FlatnessError, match="already exists; pass --resume"):
        loss_surface(net, data, spec, output=SurfaceFile(part))
    with pytest.raises(FlatnessError, match=r"other settings \(seed: 0 in the file, 1 now\)"):
        loss_surface(net, data, SurfaceSpec(x="-1:1:5", y="-1:1:4", seed=1), output=SurfaceFile(part, resume=True))
    calls = []
    loss_surface(net, data, SurfaceSpec(x="-1:1:5", y="-1:1:4", chunk_size=7), output=SurfaceFile(part, resume=True),
                 callback=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (14, 14)  # only the missing cells were computed
    a, b = read_surface(tmp_path / "full.h5"), read_surface(part)
    for key in ("train_loss", "train_acc"):
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(full["train_loss"], b["train_loss"])
    # force starts over
    loss_surface(net, data, SurfaceSpec(x="-1:1:3"), output=SurfaceFile(part, force=True))
    assert read_surface(part).dim == 1


def test_not_a_surface_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.h5"
    bad.write_text("no")
    with pytest.raises(FlatnessError, match="cannot be opened as an HDF5"):
        read_surface(bad)
    with h5py.File(tmp_path / "y.h5", "w") as f:
        f["something"] = np.zeros(3)
    with pytest.raises(FlatnessError, match="no 'xcoordinates'"):
        read_surface(tmp_path / "y.h5")
    with pytest.raises(FlatnessError, match="does not exist"):
        read_surface(tmp_path / "missing.h5")


def _as_old_ij_file(path: Path) -> None:
    """Rewrite one of our files the way flatness < 0.2 stored it: (nx, ny), [i, j] at (x_i, y_j), index_order "ij"."""
    with h5py.File(path, "r+") as f:
        for key in ("train_loss", "train_acc"):
            data = f[key][()]
            del f[key]
            f[key] = data.T
        f.attrs["index_order"] = "ij"


def test_old_ij_files_read_and_resume(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    spec = SurfaceSpec(x="-1:1:5", y="0:1:3", chunk_size=4)
    full = loss_surface(net, data, spec, output=SurfaceFile(tmp_path / "full.h5"))
    old = tmp_path / "old.h5"
    with pytest.raises(_Stop):
        loss_surface(net, data, spec, output=SurfaceFile(old), callback=_interrupt_after(2))
    _as_old_ij_file(old)
    with h5py.File(old, "r") as f:
        assert f["train_loss"].shape == (5, 3)
    mid = read_surface(old)  # converted on read
    assert mid["train_loss"].shape == (3, 5)
    done = ~np.isnan(mid["train_loss"])
    assert done.sum() == 8
    np.testing.assert_array_equal(mid["train_loss"][done], full["train_loss"][done])
    loss_surface(net, data, spec, output=SurfaceFile(old, resume=True))
    with h5py.File(old, "r") as f:
        assert f.attrs["index_order"] == "xy" and f["train_loss"].shape == (3, 5)
    np.testing.assert_array_equal(read_surface(old)["train_loss"], full["train_loss"])


def test_a_file_being_written_is_locked(tmp_path: Path) -> None:
    from flatness.landscape.storage import SurfaceLock

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    out = tmp_path / "s.h5"
    with pytest.raises(_Stop):
        loss_surface(net, data, SurfaceSpec(x="-1:1:9", chunk_size=2), output=SurfaceFile(out), callback=_interrupt_after(1))
    before = out.read_bytes()
    with SurfaceLock(out):  # as another run writing it would hold it (an open file description lock)
        import subprocess
        import sys

        code = (f"from flatness.landscape.storage import SurfaceLock; SurfaceLock({str(out)!r})")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode != 0 and "is being written by another flatness process" in r.stderr
    assert out.read_bytes() == before
    SurfaceLock(out).release()  # released with its holder
