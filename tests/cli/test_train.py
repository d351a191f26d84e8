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
from tests.conftest import RUN_DIR, run_cli

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


# ---------------------------------------------------------------- issue 14: the train cases
SMALL = ["--model", "mlp", "--data", "synthetic", "--batch-size", "64", "--quiet", "--device", "cpu"]


def _one_error_line(r: subprocess.CompletedProcess, pattern: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
    assert __import__("re").search(pattern, lines[0]), lines[0]
    return lines[0]


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (but the lock file) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_seed_1e20_is_one_line(tmp_path: Path) -> None:
    r = run_cli("train", *SMALL, "--epochs", "1", "--seed", "1e20", "--out", str(tmp_path / "run"))
    _one_error_line(r, "--seed")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flag, value",
    [("--seed", "100000000000000000000"), ("--seed", "-1"), ("--seed", "9223372036854775808"), ("--save-every", "-3"),
     ("--val-split", str(2**70)), ("--val-split", "-3"), ("--cutout", "-3"), ("--batch-size", str(2**70)),
     ("--track-curvature", "-3"), ("--epochs", "0"), ("--track-samples", "0")],
)
def test_out_of_range_ints(tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, value: str) -> None:
    """The entry function in this process (the subprocess path is the test above): exit 2, one line, nothing created."""
    from flatness.cli.main import main

    assert main(["train", *SMALL, "--epochs", "1", flag, value, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and flag in err[0], err
    assert not (tmp_path / "run").exists()


def test_resume_of_missing_directory_is_refused(tmp_path: Path) -> None:
    r = run_cli("train", *SMALL, "--epochs", "1", "--resume", "--out", str(tmp_path / "nothing"))
    line = _one_error_line(r, "no run in .*nothing")
    assert "without --resume" in line
    assert not (tmp_path / "nothing").exists()


def test_resume_with_fewer_epochs_than_done_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli("train", *SMALL, "--epochs", "3", "--out", str(run)).returncode == 0
    before = _snapshot(run)
    r = run_cli("train", "--resume", "--epochs", "1", "--out", str(run))
    _one_error_line(r, r"already trained 3 epochs .*--epochs 1 is fewer.*--epochs 3 or more")
    assert _snapshot(run) == before


def _without_dac_override() -> None:
    """preexec_fn: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so root obeys file permissions.

    The tests run as root, where a read-only folder does not stop writes.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _run_restricted(*args: str) -> subprocess.CompletedProcess:
    preexec = _without_dac_override if os.geteuid() == 0 else None
    return subprocess.run([sys.executable, "-m", "flatness", *args], cwd=RUN_DIR, env={**os.environ}, capture_output=True,
                          text=True, timeout=300, preexec_fn=preexec)


def test_resume_on_unwritable_run_dir(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli("train", *SMALL, "--epochs", "2", "--out", str(run)).returncode == 0
    (run / "final.pt").unlink()  # an unfinished run
    before = _snapshot(run)
    run.chmod(0o555)
    (run / "checkpoints").chmod(0o555)
    try:
        r = _run_restricted("train", "--resume", "--out", str(run))
    finally:
        run.chmod(0o755)
        (run / "checkpoints").chmod(0o755)
    # a finished run holds no .lock (issue 23), so taking the lock is the first write that fails
    _one_error_line(r, f"cannot write to (run directory )?{run}: Permission denied; make it writable")
    assert _snapshot(run) == before


def test_force_keeps_old_run_when_checkpoints_cannot_be_written(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli("train", *SMALL, "--epochs", "2", "--out", str(run)).returncode == 0
    before = _snapshot(run)
    (run / "checkpoints").chmod(0o555)
    try:
        r = _run_restricted("train", *SMALL, "--epochs", "2", "--seed", "1", "--force", "--out", str(run))
    finally:
        (run / "checkpoints").chmod(0o755)
    _one_error_line(r, f"cannot write to {run / 'checkpoints'}: Permission denied")
    assert _snapshot(run) == before  # final.pt, metrics.jsonl, config.json and the checkpoints all intact


def test_second_train_on_a_running_run_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "flatness", "train", *SMALL, "--epochs", "100000", "--out", str(run)],
                             cwd=RUN_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "last.pt").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read().decode()[-2000:]
        try:  # without the lock the second run would train for ever beside the first
            r = run_cli("train", "--resume", "--out", str(run), timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("a second train --resume on a running run was not refused")
        _one_error_line(r, "in use by another flatness train")
        r = run_cli("train", *SMALL, "--epochs", "1", "--force", "--out", str(run), timeout=30)
        _one_error_line(r, "in use by another flatness train")
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # once the holder is gone (even by SIGKILL), the lock is free again
    r = run_cli("train", "--resume", "--epochs", "1", "--out", str(run))
    assert r.returncode in (0, 2) and "in use" not in r.stderr


def test_tracked_lambda_max_equals_flatness_hessian_on_the_checkpoint(tmp_path: Path) -> None:
    """Issue 17: the lambda_max tracked at update s is what ``flatness hessian`` measures on the checkpoint of update s.

    Issue 21: with a validation split, both take the first samples the run TRAINED on (never held-out ones).
    """
    import json

    run = tmp_path / "run"
    # synthetic: 256 samples, 64 held out, batch 64 -> 3 updates per epoch; the epoch checkpoints hold updates 3 and 6
    r = run_cli("train", "--model", "cnn1d", "--data", "synthetic", "--batch-size", "64", "--epochs", "2", "--quiet", "--device", "cpu",
                "--track-curvature", "3", "--track-samples", "100", "--save-every", "3", "--val-split", "64", "--out", str(run))
    assert r.returncode == 0, r.stderr
    rows = {row["step"]: row for row in map(json.loads, (run / "curvature.jsonl").read_text().splitlines())}
    assert sorted(rows) == [3, 6]
    for ckpt, step in ((run / "checkpoints" / "epoch_0001.pt", 3), (run / "final.pt", 6)):
        assert read_checkpoint_file(ckpt)["step"] == step
        out = tmp_path / f"h{step}.json"
        r = run_cli("hessian", str(ckpt), "--out", str(out), "--top-k", "1", "--samples", "100", "--tol", "1e-7", "--quiet", "--device", "cpu")
        assert r.returncode == 0, r.stderr
        reference = json.loads(out.read_text())["top_eigenvalues"][0]
        assert rows[step]["lambda_max"] == pytest.approx(reference, rel=1e-4), step
