"""``flatness train --log``: TensorBoard event files and user loggers hold what the JSONL files hold."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from flatness.cli.main import main
from tests.conftest import run_cli

SMALL = ["--model", "mlp", "--data", "synthetic", "--batch-size", "64", "--epochs", "2", "--quiet", "--device", "cpu",
         "--method", "sam", "--track-curvature", "2", "--track-samples", "64"]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_tensorboard_holds_the_metrics_and_curvature_rows(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run, tb = tmp_path / "run", tmp_path / "tb"
    res = run_cli("train", *SMALL, "--log", "tensorboard", str(tb), "--out", str(run), env=subprocess_env)
    assert res.returncode == 0, res.stderr
    acc = event_accumulator.EventAccumulator(str(tb))
    acc.Reload()
    metrics, curvature = _jsonl(run / "metrics.jsonl"), _jsonl(run / "curvature.jsonl")
    assert len(metrics) == 2 and len(curvature) >= 2
    for key in ("train_loss", "test_loss", "test_acc", "lr"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [m["step"] for m in metrics]
        assert [e.value for e in events] == pytest.approx([m[key] for m in metrics], rel=1e-6)
    events = acc.Scalars("curvature/lambda_max")
    rows = [r for r in curvature if "lambda_max" in r]
    assert [e.step for e in events] == [r["step"] for r in rows]
    assert [e.value for e in events] == pytest.approx([r["lambda_max"] for r in rows], rel=1e-6)


def test_own_logger_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mylog.py").write_text(textwrap.dedent(
        """
        import json


        class JsonLines:
            def __init__(self, target):
                self.path = target

            def log(self, metrics, step):
                with open(self.path, "a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\\n")
        """
    ))
    monkeypatch.chdir(tmp_path)
    assert main(["train", *SMALL, "--log", "mylog.py:JsonLines", "log.jsonl", "--out", "run"]) == 0
    logged = _jsonl(tmp_path / "log.jsonl")
    epochs = [r for r in logged if "train_loss" in r]
    assert [r["train_loss"] for r in epochs] == [m["train_loss"] for m in _jsonl(tmp_path / "run" / "metrics.jsonl")]
    curv = [r["curvature/lambda_max"] for r in logged if "curvature/lambda_max" in r]
    assert curv == [r["lambda_max"] for r in _jsonl(tmp_path / "run" / "curvature.jsonl") if "lambda_max" in r]


def test_missing_tensorboard_is_one_line(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """Without the tensorboard package: ``error: ... pip install 'flatness[tensorboard]'``, exit 2, nothing trained."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "tensorboard.py").write_text("raise ImportError('No module named tensorboard')\n")
    base = subprocess_env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    env = {**subprocess_env, "PYTHONPATH": os.pathsep.join(p for p in (str(hide), base) if p)}
    res = run_cli("train", *SMALL, "--log", "tensorboard", str(tmp_path / "tb"), "--out", str(tmp_path / "run"), env=env)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["error: TensorBoard logging needs the tensorboard package: pip install 'flatness[tensorboard]'"]
    assert not (tmp_path / "run").exists()


def test_unknown_logger_kind(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", *SMALL, "--log", "wandb", "x", "--out", str(tmp_path / "run")]) == 2
    assert "unknown logger 'wandb'; expected one of tensorboard or module:callable" in capsys.readouterr().err
