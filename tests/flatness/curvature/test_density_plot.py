"""``flatness.plots.density.plot_spectral_density`` on a hessian JSON result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flatness.curvature import slq_density
from flatness.errors import FlatnessError
from flatness.plots.density import plot_spectral_density

PNG = b"\x89PNG\r\n\x1a\n"


def _result() -> dict:
    ev = torch.cat([torch.zeros(150), torch.linspace(0.5, 2.0, 40), torch.tensor([9.0, 12.0])]).double()
    d = slq_density(torch.diag(ev), 30, 2, num_points=500)
    return {"checkpoint": "runs/a/final.pt", "top_eigenvalues": [12.0, 9.0], "trace": float(ev.sum()), "density": d.to_dict()}


@pytest.mark.parametrize("log", [True, False])
def test_writes_a_figure(tmp_path: Path, log: bool) -> None:
    out = plot_spectral_density(_result(), tmp_path / "density.png", log=log)
    assert out == tmp_path / "density.png" and out.read_bytes()[:8] == PNG


@pytest.mark.parametrize("suffix, magic", [(".pdf", b"%PDF"), (".svg", b"<?xml")])
def test_other_formats(tmp_path: Path, suffix: str, magic: bytes) -> None:
    out = plot_spectral_density(_result(), tmp_path / f"density{suffix}")
    assert out.read_bytes()[: len(magic)] == magic


def test_minimal_result(tmp_path: Path) -> None:
    """Only density.grid and density.values are required."""
    out = plot_spectral_density({"density": {"grid": [0, 1, 2], "values": [0.1, 1.0, 0.0]}}, tmp_path / "d.png")
    assert out.read_bytes()[:8] == PNG


@pytest.mark.parametrize(
    "result, out, message",
    [
        ({"top_eigenvalues": [1.0], "density": None}, "d.png", "no spectral density: run flatness hessian with --density"),
        ({"top_eigenvalues": [1.0]}, "d.png", "no spectral density"),
        ({"density": {"grid": [0, 1], "values": [1]}}, "d.png", "malformed"),
        ({"density": {"grid": [0, 1], "values": ["a", 1]}}, "d.png", "non-numeric"),
        ({"density": {"grid": [0, 1], "values": [1, 0]}}, "d.jpg", "must end in .png, .pdf or .svg"),
    ],
)
def test_errors(tmp_path: Path, result: dict, out: str, message: str) -> None:
    with pytest.raises(FlatnessError, match=message):
        plot_spectral_density(result, tmp_path / out)
    assert not (tmp_path / out).exists()


def test_accepts_a_density_result(tmp_path: Path) -> None:
    """The Python API's DensityResult plots directly, the same curve as its JSON form."""
    ev = torch.cat([torch.zeros(50), torch.tensor([3.0, 5.0])]).double()
    d = slq_density(torch.diag(ev), 20, 1, num_points=300)
    out = plot_spectral_density(d, tmp_path / "d.png")
    assert out.read_bytes()[:8] == PNG
