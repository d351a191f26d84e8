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
from flatness.landscape import loss_surface

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
    loss_surface(net, data, "-1:1:21", test_batches=data, out=one)
    loss_surface(net, data, "-1:1:13", "-0.5:0.5:9", out=two)  # non-square on purpose
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
]


@pytest.mark.parametrize(("args", "message"), ERRORS, ids=[m[:30] for _, m in ERRORS])
def test_errors(surfaces: dict, capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    folder = surfaces["folder"]
    (folder / "notes.txt").write_text("hello")
    (folder / "bad.json").write_text("{")
    (folder / "list.json").write_text("[1, 2]")
    (folder / "bad.h5").write_text("not hdf5")
    (folder / "exists.png").write_bytes(PNG)
    args = [a.format(**{k: str(v) for k, v in surfaces.items()}) for a in args]
    if "--out" not in args:
        args += ["--out", str(folder / "out.png")]
    code, err = _plot(capsys, *args)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err


def test_force_overwrites(surfaces: dict, capsys: pytest.CaptureFixture) -> None:
    out = surfaces["folder"] / "again.png"
    assert _plot(capsys, surfaces["2d"], "--out", out)[0] == 0
    assert _plot(capsys, surfaces["2d"], "--out", out)[0] == 2
    assert _plot(capsys, surfaces["2d"], "--out", out, "--force")[0] == 0
