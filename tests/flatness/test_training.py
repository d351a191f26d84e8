"""The training loop: run directory, metrics, divergence, in-process resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flatness.checkpoint import load_checkpoint, read_checkpoint_file
from flatness.errors import FlatnessError
from flatness.training import TrainConfig, train
from flatness.training.loop import TrainingDiverged

KEYS = {"epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"}


def _cfg(**kw) -> TrainConfig:
    base = {"model": "mlp", "data": "synthetic", "epochs": 3, "batch_size": 32, "lr": 0.05}
    return TrainConfig(**{**base, **kw})


def test_run_directory_layout(tmp_path: Path) -> None:
    res = train(_cfg(), tmp_path / "run")
    run = tmp_path / "run"
    assert (run / "config.json").exists() and (run / "final.pt").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt", "last.pt"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(set(r) == KEYS for r in rows)
    assert [r["step"] for r in rows] == [8, 16, 24]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    config = json.loads((run / "config.json").read_text())
    assert config["model_kwargs"] == {"in_features": 40, "num_classes": 10}
    ckpt = load_checkpoint(run / "final.pt")
    assert ckpt.config["method"] == "sgd" and len(ckpt.metrics) == 3 and ckpt.epoch == 3
    assert res.metrics == rows


def test_same_seed_same_numbers(tmp_path: Path) -> None:
    a = train(_cfg(), tmp_path / "a").metrics
    b = train(_cfg(), tmp_path / "b").metrics
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)
    c = train(_cfg(seed=1), tmp_path / "c").metrics
    assert strip(a) != strip(c)


def test_resume_after_crash_is_exact(tmp_path: Path) -> None:
    full = tmp_path / "full"
    train(_cfg(save_every=5), full)
    crash = tmp_path / "crash"
    cfg = _cfg(save_every=5)

    class Killed(Exception):
        pass

    def stop(row: dict) -> None:
        raise Killed

    with pytest.raises(Killed):
        train(cfg, crash, on_epoch=stop)
    # last.pt holds epoch 1; resume runs epochs 2..3
    train(_cfg(save_every=5), crash, resume=True)
    a = read_checkpoint_file(full / "final.pt")
    b = read_checkpoint_file(crash / "final.pt")
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a["metrics"]) == strip(b["metrics"])


def test_existing_run_dir_is_protected(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_cfg(epochs=1), run)
    before = (run / "final.pt").read_bytes()
    with pytest.raises(FlatnessError, match="already exists"):
        train(_cfg(epochs=1), run)
    assert (run / "final.pt").read_bytes() == before
    with pytest.raises(FlatnessError, match="settings differ"):
        train(_cfg(epochs=1, lr=0.5), run, resume=True)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(FlatnessError, match="not a flatness run directory"):
        train(_cfg(epochs=1), other, force=True)
    assert (other / "thesis.tex").read_text() == "precious"


def test_divergence_stops_with_epoch_and_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"epoch \d+, step \d+"):
        train(_cfg(lr=1e6, momentum=0.0, weight_decay=0.0, epochs=5, schedule="constant"), run)
    assert not (run / "final.pt").exists()


@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"epochs": 0}, "--epochs"),
        ({"batch_size": -1}, "--batch-size"),
        ({"lr": -0.1}, "--lr"),
        ({"momentum": 1.0}, "--momentum"),
        ({"schedule": "linear"}, "--schedule"),
        ({"method": "adamw"}, "unknown method 'adamw'"),
        ({"model": "resnet18"}, "takes 3x32x32 images"),
    ],
)
def test_bad_config(tmp_path: Path, kw: dict, pattern: str) -> None:
    with pytest.raises(FlatnessError, match=pattern):
        train(_cfg(**kw), tmp_path / "run")
