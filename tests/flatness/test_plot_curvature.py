"""``flatness plot RUN/curvature.jsonl``: lambda_max against updates, SGD stability lines, measuring cost; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flatness.cli.main import main
from flatness.errors import FlatnessError
from flatness.plots.curvature import plot_curvature_track
from tests.conftest import run_cli

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tracked") / "run"
    done = run_cli("train", "--data", "synthetic", "--model", "mlp", "--epochs", "2", "--track-curvature", "2",
                   "--device", "cpu", "--quiet", "--out", str(root))
    assert done.returncode == 0, done.stderr
    return root


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_figure_holds_the_tracked_values_and_thresholds(run: Path, tmp_path: Path) -> None:
    rows = _rows(run / "curvature.jsonl")
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"] == "sgd" and cfg["momentum"] > 0 and len(rows) >= 2
    fig = plot_curvature_track(run / "curvature.jsonl", tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    curve = [line for line in ax.lines if len(line.get_xdata()) == len(rows) and line.get_linestyle() == "-"]
    assert len(curve) == 1
    np.testing.assert_array_equal(curve[0].get_xdata(), [r["step"] for r in rows])
    np.testing.assert_array_equal(curve[0].get_ydata(), [r["lambda_max"] for r in rows])
    flat = {line.get_linestyle(): float(line.get_ydata()[0]) for line in ax.lines if line is not curve[0]}
    assert flat["--"] == pytest.approx(2.0 / cfg["lr"])
    assert flat[":"] == pytest.approx((2 + 2 * cfg["momentum"]) / cfg["lr"])
    fraction = _rows(run / "metrics.jsonl")[-1]["extra_fraction"]
    assert f"+{100 * fraction:.1f}% over untracked training" in ax.get_title()


def test_cost_of_an_older_run_is_read_as_extra_over_untracked(run: Path, tmp_path: Path) -> None:
    """Older metrics.jsonl hold only curvature_fraction f = measuring / (training + measuring): extra = f / (1 - f)."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "curvature.jsonl").write_text((run / "curvature.jsonl").read_text())
    (old / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "curvature_fraction": 0.2}) + "\n")
    fig = plot_curvature_track(old, tmp_path / "o.png")
    assert "+25.0% over untracked training" in fig.axes[0].get_title()


def test_cli_file_and_run_directory(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plot", str(run / "curvature.jsonl"), "--out", str(tmp_path / "a.png")]) == 0
    assert main(["plot", str(run), "--out", str(tmp_path / "b.svg")]) == 0
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG and b"<svg" in (tmp_path / "b.svg").read_bytes()[:2000]
    capsys.readouterr()


def test_no_thresholds_for_other_methods(run: Path, tmp_path: Path) -> None:
    other = tmp_path / "sam"
    other.mkdir()
    (other / "curvature.jsonl").write_text((run / "curvature.jsonl").read_text())
    (other / "config.json").write_text(json.dumps({"method": "sam", "lr": 0.1, "momentum": 0.9}))
    fig = plot_curvature_track(other, tmp_path / "s.png")
    assert len(fig.axes[0].lines) == 1


@pytest.mark.parametrize("text", ["", '{"epoch": 1, "step": 4, "train_loss": 1.0}\n', "not json\n"])
def test_bad_input_is_one_error_line(text: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "curvature.jsonl"
    bad.write_text(text)
    with pytest.raises(FlatnessError):
        plot_curvature_track(bad, tmp_path / "x.png")
    assert main(["plot", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert not (tmp_path / "x.png").exists()


def test_folder_without_track_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "curvature.jsonl" in capsys.readouterr().err
