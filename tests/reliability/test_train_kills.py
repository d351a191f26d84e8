"""SIGKILL ``flatness train`` at random moments, resume, and compare with an uninterrupted run.

Several methods (SGD, SAM, m-ARWP with the alternate scheme) are killed
repeatedly - during start-up, mid-epoch, during checkpoint writes - and
resumed each time with ``--resume``. The final weights, optimizer state and
metrics.jsonl (all but the wall-clock ``seconds``) must equal an
uninterrupted run bitwise, and every checkpoint file must load.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flatness.checkpoint import read_checkpoint_file
from tests.conftest import RUN_DIR, run_cli

BASE = ["--model", "mlp", "--data", "mnist1d", "--epochs", "4", "--batch-size", "16", "--save-every", "7", "--quiet", "--device", "cpu"]
METHODS = {
    "sgd": ["--method", "sgd", "--track-curvature", "40", "--track-samples", "64"],  # tracking survives kills too
    "sam": ["--method", "sam", "--rho", "0.05"],
    # alternate scheme: --epochs 2 is 4 data epochs (the same updates as 2 epochs of SGD)
    "m-arwp": ["--method", "m-arwp", "--sigma", "0.02", "--mix-batches", "alternate", "--sigma-inc", "1", "--epochs", "2"],
}
KILLS_PER_METHOD = 4


def _tensors_equal(a, b) -> bool:  # noqa: ANN001 - nested checkpoint values
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "curvature_fraction", "extra_fraction")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _curvature(run: Path) -> list[dict]:
    from flatness.training.tracking import TIME_KEYS

    return [{k: v for k, v in json.loads(line).items() if k not in TIME_KEYS}
            for line in (run / "curvature.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_random_kills_then_resume(tmp_path: Path, method: str, kill_log: list) -> None:
    args = BASE + METHODS[method]
    ref = tmp_path / "ref"
    r = run_cli("train", *args, "--out", str(ref))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "killed"
    rng = random.Random(hash(method) % 1000)
    env = {**os.environ}
    kills = 0
    for attempt in range(KILLS_PER_METHOD):
        cmd = [sys.executable, "-m", "flatness", "train", *args, "--out", str(run)] + (["--resume"] if run.exists() else [])
        last = run / "checkpoints" / "last.pt"
        before = last.stat().st_mtime_ns if last.exists() else None
        proc = subprocess.Popen(cmd, cwd=RUN_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Wait until this process has work in progress: on the first attempt until it wrote the run's
        # config.json (start-up done, run dir being filled), later until it wrote a new checkpoint; then
        # kill a random moment later (mid-epoch, or in the middle of the next checkpoint write).
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            now = last.stat().st_mtime_ns if last.exists() else None
            if (attempt == 0 and (run / "config.json").exists()) or (now is not None and now != before):
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05 if attempt == 0 else 0.15))
        in_progress = (run / "config.json").exists() and not (run / "final.pt").exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # The kill landed: the process died by SIGKILL (not a normal exit) while a partial run existed.
        assert proc.returncode == -signal.SIGKILL, (attempt, proc.returncode, proc.stderr.read().decode()[-2000:])
        assert in_progress and not (run / "final.pt").exists(), f"attempt {attempt}: no work was in progress when the kill landed"
        kills += 1
        # every checkpoint that exists after a kill is complete and loads
        for ck in (run / "checkpoints").glob("*.pt"):
            read_checkpoint_file(ck)
    kill_log.append((method, kills, KILLS_PER_METHOD))
    if not (run / "final.pt").exists():
        r = run_cli("train", *args, "--out", str(run), "--resume")
        assert r.returncode == 0, r.stderr
    assert kills == KILLS_PER_METHOD
    a, b = read_checkpoint_file(ref / "final.pt"), read_checkpoint_file(run / "final.pt")
    assert _tensors_equal(a["state_dict"], b["state_dict"])
    assert _tensors_equal(a["optimizer"], b["optimizer"])
    assert _metrics(ref) == _metrics(run)
    if (ref / "curvature.jsonl").exists():  # tracked lambda_max: the same points and values as the uninterrupted run
        assert _curvature(ref) == _curvature(run) and len(_curvature(ref)) == 25
    assert not list(run.rglob("*.tmp"))


@pytest.fixture(scope="module")
def kill_log():
    log: list = []
    yield log
    landed = sum(k for _, k, _ in log)
    tried = sum(t for _, _, t in log)
    message = f"kills landed: {landed} of {tried} (flatness train, SIGKILL mid-run; {log})"
    sys.stderr.write(f"\n[reliability] {message}\n")
    print(message)
