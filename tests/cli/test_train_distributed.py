"""``flatness train`` under torchrun (2 gloo processes).

SGD and m-ARWP through DDP match one process; ``--parallel-roles`` matches a
single-process transcription of the two-role scheme (not plain m-ARWP).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flatness.checkpoint import read_checkpoint_file
from tests.cli.parallel_roles_reference import two_role_marwp
from tests.conftest import RUN_DIR, run_cli

ARGS = ["--model", "mlp", "--data", "synthetic", "--epochs", "2", "--batch-size", "32", "--quiet", "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", [["--method", "sgd"], ["--method", "m-arwp", "--sigma", "0.5"]], ids=["sgd", "m-arwp"])
def test_data_parallel_equals_single_process(tmp_path: Path, method: list[str]) -> None:
    """DDP (2 gloo processes, half the batch each) gives the single-process weights.

    m-ARWP: both passes are averaged and the noise generators agree across ranks,
    so the mixed gradient is the full-batch one; this also checks that the clean
    gradient kept aside is not a DDP bucket view overwritten by the perturbed pass.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "flatness", "train", *ARGS, *method, "--out", str(tmp_path / "ddp")]
    r = subprocess.run(cmd, cwd=RUN_DIR, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count(f"trained {method[1]}") == 1  # only rank 0 reports
    single = run_cli("train", *ARGS, *method, "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    a = read_checkpoint_file(tmp_path / "ddp" / "final.pt")
    b = read_checkpoint_file(tmp_path / "single" / "final.pt")
    for k in b["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], atol=1e-5, rtol=1e-5)
    assert abs(a["metrics"][-1]["train_loss"] - b["metrics"][-1]["train_loss"]) < 1e-5


ROLES = ["--method", "m-arwp", "--parallel-roles", "--sigma", "0.5", "--lam", "0.7", "--eta", "1.0"]


def test_parallel_roles_equals_its_single_process_transcription(tmp_path: Path) -> None:
    """``--parallel-roles`` (2 gloo processes) = the two-role math written out in one process, to 1e-6.

    Rank 0 takes the clean gradient on the even positions of each global batch,
    rank 1 the perturbed one (noise stream 0) on the odd positions, and both apply
    lam * g_perturbed + (1 - lam) * g_clean (tests/cli/parallel_roles_reference.py).
    lam = 0.7 makes the weighting visible; sigma 0.5 and eta 1 the noise and the
    ARWP accumulator. The same transcription with the halves swapped is far off,
    and single-process m-ARWP (no roles: both gradients on the whole batch) differs.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "flatness", "train", *ARGS, *ROLES, "--out", str(tmp_path / "par")]
    r = subprocess.run(cmd, cwd=RUN_DIR, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ck = read_checkpoint_file(tmp_path / "par" / "final.pt")
    assert ck["config"]["parallel_roles"] is True and ck["step"] == 16
    weights, losses = two_role_marwp(ck["config"])
    for k, v in weights.items():
        torch.testing.assert_close(ck["state_dict"][k], v, atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    for row, loss in zip(ck["metrics"], losses, strict=True):
        assert abs(row["train_loss"] - loss) < 1e-5 * max(1.0, abs(loss))
    swapped, _ = two_role_marwp(ck["config"], swap_roles=True)
    assert max(float((ck["state_dict"][k] - v).abs().max()) for k, v in swapped.items()) > 1e-2
    single = run_cli("train", *ARGS, *[a for a in ROLES if a != "--parallel-roles"], "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    b = read_checkpoint_file(tmp_path / "single" / "final.pt")
    assert max(float((ck["state_dict"][k] - b["state_dict"][k]).abs().max()) for k in b["state_dict"]) > 1e-3


def test_parallel_roles_needs_torchrun(tmp_path: Path) -> None:
    r = run_cli("train", *ARGS, "--method", "m-arwp", "--parallel-roles", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "torchrun" in r.stderr and not (tmp_path / "x").exists()


def test_sam_under_ddp_perturbs_per_rank(tmp_path: Path) -> None:
    """SAM under DDP: the first pass runs under no_sync (per-rank perturbation), the update is shared.

    The result differs from one process (each rank ascends along its own half-batch
    gradient), but training works and every rank holds the same weights.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "flatness", "train", *ARGS, "--method", "sam", "--out", str(tmp_path / "ddp")]
    r = subprocess.run(cmd, cwd=RUN_DIR, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    single = run_cli("train", *ARGS, "--method", "sam", "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    a = read_checkpoint_file(tmp_path / "ddp" / "final.pt")
    b = read_checkpoint_file(tmp_path / "single" / "final.pt")
    assert a["metrics"][-1]["train_loss"] < a["metrics"][0]["train_loss"]
    diff = max(float((a["state_dict"][k] - b["state_dict"][k]).abs().max()) for k in b["state_dict"])
    assert diff > 1e-4  # per-rank perturbation: not the single-process path
