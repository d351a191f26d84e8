"""``flatness train`` as a real subprocess: errors, SIGKILL + --resume, demo."""

from __future__ import annotations

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
from tests.conftest import REPO, RUN_DIR, run_cli

ARGS = ["--model", "mlp", "--data", "mnist1d", "--epochs", "4", "--batch-size", "16", "--save-every", "37", "--quiet"]


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    r = run_cli("train", *ARGS, "--out", str(ref))
    assert r.returncode == 0, r.stderr
    killed = tmp_path / "killed"
    env = {**os.environ}
    proc = subprocess.Popen([sys.executable, "-m", "flatness", "train", *ARGS, "--out", str(killed)], cwd=RUN_DIR, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(random.Random(0).uniform(0.05, 0.4))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final.pt").exists(), "the run finished before it could be killed"
    step_at_kill = read_checkpoint_file(last)["step"]
    r = run_cli("train", "--out", str(killed), "--resume", "--quiet")
    assert r.returncode == 0, r.stderr
    a, b = read_checkpoint_file(ref / "final.pt"), read_checkpoint_file(killed / "final.pt")
    assert step_at_kill < b["step"]
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    ma = [__import__("json").loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    mb = [__import__("json").loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert _strip(ma) == _strip(mb) and len(ma) == 4


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--model", "resnet50"], "unknown model 'resnet50'"),
        (["--data", "imagenet"], "unknown dataset 'imagenet'"),
        (["--epochs", "0"], "positive integer"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--data", "cifar10", "--model", "resnet18"], "--data-dir"),
        (["--model-kwargs", "{bad"], "JSON object"),
        (["--lr", "-1"], "--lr must be positive"),
    ],
)
def test_bad_invocations(tmp_path: Path, args: list[str], pattern: str) -> None:
    r = run_cli("train", "--epochs", "1", "--out", str(tmp_path / "run"), *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr
    assert __import__("re").search(pattern, lines[0]), lines[0]


def test_existing_out_untouched(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run_cli("train", "--model", "mlp", "--data", "synthetic", "--epochs", "1", "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    before = (out / "final.pt").read_bytes()
    r = run_cli("train", "--model", "mlp", "--data", "synthetic", "--epochs", "1", "--quiet", "--out", str(out))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "--force" in r.stderr
    assert (out / "final.pt").read_bytes() == before


def test_help_has_examples() -> None:
    r = run_cli("train", "--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "--resume" in r.stdout
    # the comparison protocol is stated where users look
    assert "epochs' worth of" in r.stdout and "2E data" in r.stdout
