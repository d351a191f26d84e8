"""A loss that turns NaN/inf stops ``flatness train`` with one line naming the epoch and step.

The last good checkpoint stays (and loads, with finite weights), ``final.pt``
is never written, and ``metrics.jsonl`` holds only the epochs that ended
well. Three ways to diverge: a learning rate too large to survive the
second epoch, one that is huge from the first step (no checkpoint yet), and
weights that turn NaN while the loss that was measured is still finite. A new
run that diverges before its first checkpoint is removed (issue 23: it used
to leave a run directory with no checkpoint in it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from flatness.checkpoint import load_checkpoint, read_checkpoint_file
from tests.conftest import run_cli

TRAIN = ["train", "--data", "synthetic", "--model", "mlp", "--batch-size", "32", "--schedule", "constant", "--device", "cpu", "--quiet"]
MESSAGE = re.compile(
    r"^error: training diverged: the (loss|test loss|weights) (became NaN or infinite|is nan|is inf) "
    r"(at|after) epoch (?P<epoch>\d+), step (?P<step>\d+); the last good checkpoint is (?P<last>[^\s,]+)(?P<rest>, .*)?$"
)


def _diverged(r) -> re.Match:  # noqa: ANN001 - CompletedProcess
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    m = MESSAGE.match(lines[0])
    assert m, lines[0]
    return m


def _finite(ckpt: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_lr_too_large_keeps_last_good_epoch(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = run_cli("train", *TRAIN[1:], "--lr", "0.5", "--epochs", "8", "--out", str(run))
    m = _diverged(r)
    epoch, step = int(m["epoch"]), int(m["step"])
    assert epoch >= 2, "diverged in the first epoch: no good checkpoint to keep"
    assert (epoch - 1) * 8 < step <= epoch * 8  # 256 samples / 32 = 8 steps per epoch
    last = run / "checkpoints" / "last.pt"
    assert m["last"] == str(last)
    assert not (run / "final.pt").exists()
    ckpt = read_checkpoint_file(last)
    assert ckpt["epoch"] == epoch - 1 and ckpt["step"] == (epoch - 1) * 8 and _finite(ckpt)
    assert last.read_bytes() == (run / "checkpoints" / f"epoch_{epoch - 1:04d}.pt").read_bytes()
    assert load_checkpoint(last).model is not None
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == list(range(1, epoch))
    assert all(row["train_loss"] == row["train_loss"] and row["test_loss"] < float("inf") for row in rows)
    assert not list(run.rglob("*.tmp"))

    r2 = run_cli("train", *TRAIN[1:], "--lr", "0.5", "--epochs", "8", "--out", str(run), "--resume")  # deterministic: same place
    assert _diverged(r2).group(0) == m.group(0)
    assert read_checkpoint_file(last)["step"] == (epoch - 1) * 8


def test_huge_lr_first_epoch_no_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = run_cli("train", *TRAIN[1:], "--lr", "1e6", "--epochs", "2", "--out", str(run))
    m = _diverged(r)
    assert m["epoch"] == "1" and 1 <= int(m["step"]) <= 8
    assert m["last"] == "none" and f"so {run} is removed; lower --lr" in m["rest"]
    assert not run.exists(), sorted(p.name for p in run.rglob("*"))


def test_huge_lr_with_step_checkpoints(tmp_path: Path) -> None:
    """With ``--save-every 1`` every step is saved until the one that diverged; all saved weights are finite."""
    run = tmp_path / "run"
    r = run_cli("train", *TRAIN[1:], "--lr", "1e20", "--epochs", "2", "--save-every", "1", "--out", str(run))
    m = _diverged(r)
    ckpt = read_checkpoint_file(run / "checkpoints" / "last.pt")
    assert ckpt["step"] < int(m["step"])
    assert _finite(ckpt)
    assert not (run / "final.pt").exists()


def test_nan_weights_are_not_checkpointed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An update that makes the weights NaN (the loss measured before it was finite) is caught before it is saved."""
    from flatness.training import TrainConfig, loop, train
    from flatness.training.loop import TrainingDiverged

    real_check = loop.check_method

    def poisoning(config):  # noqa: ANN001, ANN202 - same signature as check_method
        spec = real_check(config)

        def build(model, c):  # noqa: ANN001, ANN202
            opt = spec.build(model, c)
            count = {"n": 0}

            def poison(*_args) -> None:  # after the 3rd update, the weights are NaN
                count["n"] += 1
                if count["n"] == 3:
                    with torch.no_grad():
                        next(model.parameters()).fill_(float("nan"))

            opt.register_step_post_hook(poison)
            return opt

        return loop.MethodSpec(build, spec.per_sample_loss, spec.grad_evals, spec.hyper)

    monkeypatch.setattr(loop, "check_method", poisoning)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"the weights became NaN or infinite at epoch 1, step 3; the last good checkpoint is .*last\.pt"):
        train(TrainConfig(model="mlp", data="synthetic", epochs=1, batch_size=32, save_every=1), run, device="cpu")
    ckpt = read_checkpoint_file(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2 and _finite(ckpt)
    assert not (run / "final.pt").exists()
