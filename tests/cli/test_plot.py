"""``flatness plot``: every kind of surface figure, formats, loss-landscape files, .json dispatch, errors."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from flatness.cli.main import main
from flatness.landscape import SurfaceFile, SurfaceSpec, loss_surface

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def surfaces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g))]
    folder = tmp_path_factory.mktemp("surfaces")
    one = folder / "one.h5"
    two = folder / "two.h5"
    loss_surface(net, data, SurfaceSpec(x="-1:1:21", test=True), test_batches=data, output=SurfaceFile(one))
    loss_surface(net, data, SurfaceSpec(x="-1:1:13", y="-0.5:0.5:9"), output=SurfaceFile(two))  # non-square on purpose
    return {"1d": one, "2d": two, "folder": folder}


def _plot(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    code = main(["plot", *(str(a) for a in args)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("kind", ["contour", "filled", "heatmap", "3d"])
@pytest.mark.parametrize("log", [False, True])
def test_2d_kinds_make_pngs(surfaces: dict, tmp_path: Path, capsys: pytest.CaptureFixture, kind: str, log: bool) -> None:
    out = tmp_path / f"{kind}.png"
    code, err = _plot(capsys, surfaces["2d"], "--kind", kind, "--out", out, *(["--log"] if log else []))
    assert code == 0, err
    data = out.read_bytes()
    assert data[:8] == PNG and len(data) > 10_000


def test_line_plot_and_formats(surfaces: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name in ("line.png", "line.pdf", "line.svg"):
        code, err = _plot(capsys, surfaces["1d"], "--out", tmp_path / name)  # kind defaults to line for 1-D
        assert code == 0, err
    assert (tmp_path / "line.png").read_bytes()[:8] == PNG
    assert (tmp_path / "line.pdf").read_bytes()[:5] == b"%PDF-"
    assert b"<svg" in (tmp_path / "line.svg").read_bytes()[:2000]
    code, err = _plot(capsys, surfaces["1d"], "--kind", "line", "--log", "--out", tmp_path / "log.png")
    assert code == 0, err


def test_accuracy_key_and_vmax(surfaces: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = _plot(capsys, surfaces["2d"], "--kind", "filled", "--key", "train_acc", "--out", tmp_path / "acc.png")
    assert code == 0, err
    code, err = _plot(capsys, surfaces["2d"], "--kind", "3d", "--vmax", "1.2", "--out", tmp_path / "v.png")
    assert code == 0, err


def test_loss_landscape_file_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "ll.h5"
    xs, ys = np.linspace(-1, 1, 6), np.linspace(-1, 1, 5)
    X, Y = np.meshgrid(xs, ys)  # their layout: values in meshgrid order, -1 where missing
    Z = (X**2 + 2 * Y**2 + 0.1).reshape(len(xs), len(ys))
    Z.ravel()[-3:] = -1
    with h5py.File(path, "w") as f:
        f["xcoordinates"], f["ycoordinates"], f["train_loss"], f["train_acc"] = xs, ys, Z, np.full_like(Z, 50.0)
    code, err = _plot(capsys, path, "--kind", "contour", "--out", tmp_path / "ll.png")
    assert code == 0, err


def test_json_goes_to_the_spectral_density_plot(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    result = {"top_eigenvalues": [3.0, 1.0], "density": {"grid": [0.0, 1.0, 2.0, 3.0], "values": [1.0, 0.5, 0.1, 0.2]}}
    src = tmp_path / "hessian.json"
    src.write_text(json.dumps(result))
    out = tmp_path / "density.png"
    code, err = _plot(capsys, src, "--out", out)  # the real plot, from flatness.plots.density
    assert code == 0, err
    assert out.read_bytes()[:8] == PNG
    calls = []  # and the flags it receives
    fake = types.ModuleType("flatness.plots.density")
    fake.plot_spectral_density = lambda r, o, **kw: calls.append((r, Path(o), kw))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flatness.plots.density", fake)
    for flag, kw in (([], {}), (["--log"], {"log": True}), (["--no-log"], {"log": False})):
        assert _plot(capsys, src, *flag, "--out", tmp_path / "d2.png")[0] == 0
        assert calls.pop() == (result, tmp_path / "d2.png", kw)
    code, err = _plot(capsys, src, "--kind", "contour", "--out", tmp_path / "d3.png")
    assert code == 2 and "apply to surface files" in err


ERRORS = [
    (["{1d}", "--kind", "contour"], r"--kind contour needs a 2-D surface"),
    (["{2d}", "--kind", "line"], r"--kind line needs a 1-D surface"),
    (["{2d}", "--trajectory"], r"has no trajectory: compute it with --run"),
    (["{2d}", "--key", "test_loss"], r"surface has no 'test_loss'"),
    (["{folder}/missing.h5"], r"input .*missing.h5 does not exist"),
    (["{folder}/notes.txt"], r"cannot plot .*notes.txt: expected a surface .h5 file or a hessian .json"),
    (["{folder}/bad.json"], r"is not valid JSON"),
    (["{folder}/list.json"], r"expected a JSON object"),
    (["{folder}/bad.h5"], r"cannot be opened as an HDF5 surface file"),
    (["{2d}", "--out", "{folder}/fig.jpg"], r"must end in .png, .pdf or .svg"),
    (["{2d}", "--out", "{folder}/exists.png"], r"already exists; pass --force"),
    (["{2d}", "--vmax", "-1"], r"--vmax -1 is not above the surface's minimum"),
    (["{2d}", "--vmax", "nan"], r"--vmax must be a finite number, got nan"),
    (["{2d}", "--vmax", "inf"], r"--vmax must be a finite number, got inf"),
    (["{2d}", "--kind", "filled", "--log", "--vmax", "0"], r"--vmax must be positive with --log"),
    (["{1d}", "--vmax", "3"], r"--vmax applies to 2-D kinds"),
    (["{folder}/hessian_ok.json", "--vmax", "3"], r"apply to surface files"),
]


@pytest.mark.parametrize(("args", "message"), ERRORS, ids=[m[:30] for _, m in ERRORS])
def test_errors(surfaces: dict, capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    folder = surfaces["folder"]
    (folder / "notes.txt").write_text("hello")
    (folder / "bad.json").write_text("{")
    (folder / "list.json").write_text("[1, 2]")
    (folder / "bad.h5").write_text("not hdf5")
    (folder / "exists.png").write_bytes(PNG)
    (folder / "hessian_ok.json").write_text(json.dumps({"top_eigenvalues": [1.0]}))
    args = [a.format(**{k: str(v) for k, v in surfaces.items()}) for a in args]
    if "--out" not in args:
        args += ["--out", str(folder / "out.png")]
    before = sorted(p.name for p in folder.iterdir())
    code, err = _plot(capsys, *args)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing created


def test_force_overwrites(surfaces: dict, capsys: pytest.CaptureFixture) -> None:
    out = surfaces["folder"] / "again.png"
    assert _plot(capsys, surfaces["2d"], "--out", out)[0] == 0
    assert _plot(capsys, surfaces["2d"], "--out", out)[0] == 2
    assert _plot(capsys, surfaces["2d"], "--out", out, "--force")[0] == 0


def test_a_failing_plot_leaves_no_new_folders(surfaces: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "figs" / "new" / "f.png"
    code, err = _plot(capsys, surfaces["2d"], "--kind", "line", "--out", out)  # a kind that does not fit
    assert code == 2 and "--kind line needs a 1-D surface" in err
    code, err = _plot(capsys, surfaces["2d"], "--vmax", "-1", "--out", out)
    assert code == 2
    assert not (tmp_path / "figs").exists()
    code, err = _plot(capsys, surfaces["2d"], "--out", out)  # and a good one makes them
    assert code == 0, err
    assert out.read_bytes()[:8] == PNG


# ---- what the figures hold (the Figure objects, not only the PNG bytes) ----


def _colorbar_range(fig) -> tuple[float, float]:  # noqa: ANN001 - matplotlib Figure
    """(lo, hi) of the colour bar's data limits: the last axes of a figure with a colour bar."""
    cax = fig.axes[-1]
    lo, hi = sorted(cax.get_ylim())
    return float(lo), float(hi)


@pytest.mark.parametrize("kind", ["filled", "heatmap"])
def test_2d_figure_content(surfaces: dict, kind: str) -> None:
    from flatness.landscape import read_surface
    from flatness.plots.surface import surface_figure

    s = read_surface(surfaces["2d"])
    z = s["train_loss"]
    top = float(z.max())
    fig = surface_figure(s, kind=kind, vmax=top)
    assert len(fig.axes) == 2  # one panel and its colour bar
    ax = fig.axes[0]
    assert ax.get_xlabel() == "x (direction 1)" and ax.get_ylabel() == "y (direction 2)"
    assert ax.get_xlim() == pytest.approx((-1.0, 1.0), abs=0.1) and ax.get_ylim() == pytest.approx((-0.5, 0.5), abs=0.1)
    lo, hi = _colorbar_range(fig)
    assert lo == pytest.approx(float(z.min()), rel=1e-6) and hi == pytest.approx(top, rel=1e-6)  # colour bar = data range
    assert "filter-normalized random directions" in ax.get_title()


def test_heatmap_draws_each_cell_where_it_belongs(surfaces: dict) -> None:
    from flatness.landscape import read_surface
    from flatness.plots.surface import surface_figure

    s = read_surface(surfaces["2d"])
    fig = surface_figure(s, kind="heatmap", vmax=float(s["train_loss"].max()))
    mesh = fig.axes[0].collections[0]
    drawn = np.asarray(mesh.get_array()).reshape(len(s.ycoordinates), len(s.xcoordinates))
    np.testing.assert_array_equal(drawn, s["train_loss"])  # row j is y_j, column i is x_i
    coords = mesh.get_coordinates()  # cell centres (shading="nearest" puts edges around them)
    assert coords.shape[:2] == (len(s.ycoordinates) + 1, len(s.xcoordinates) + 1)


def test_3d_and_contour_and_line_figure_content(surfaces: dict) -> None:
    from flatness.landscape import read_surface
    from flatness.plots.surface import surface_figure

    s = read_surface(surfaces["2d"])
    fig = surface_figure(s, kind="3d")
    assert len(fig.axes) == 2
    assert fig.axes[0].get_zlabel() == "train_loss"
    contour = surface_figure(s, kind="contour", log=True)
    assert len(contour.axes) == 1 and "log10 train_loss" in contour.axes[0].get_title()
    levels = contour.axes[0].collections[0].levels if hasattr(contour.axes[0].collections[0], "levels") else None
    if levels is not None:
        assert float(np.min(levels)) == pytest.approx(float(np.log10(s["train_loss"]).min()), rel=1e-6)
    line = surface_figure(read_surface(surfaces["1d"]))
    ax, acc = line.axes
    assert ax.get_ylabel() == "loss" and acc.get_ylabel() == "accuracy (%)" and ax.get_xlabel() == "x (direction 1)"
    labels = [h.get_label() for h in ax.get_legend().legend_handles]
    assert labels == ["train loss", "train accuracy", "test loss", "test accuracy"]
    one = read_surface(surfaces["1d"])
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), one["train_loss"])
