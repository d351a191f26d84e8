"""Every --method through the trainer: loss falls, resume is exact, budgets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flatness.checkpoint import read_checkpoint_file
from flatness.errors import FlatnessError
from flatness.training import TrainConfig, train
from flatness.training.methods import grad_evals_per_batch, method_names

METHODS = ["sgd", "sam", "asam", "delta-sam", "rwp", "arwp", "m-rwp", "m-arwp"]


def _cfg(**kw) -> TrainConfig:
    base = {"model": "mlp", "data": "synthetic", "epochs": 3, "batch_size": 32, "lr": 0.05, "sigma": 0.01}
    return TrainConfig(**{**base, **kw})


def test_all_methods_are_registered() -> None:
    assert set(method_names()) == set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_loss_falls(tmp_path: Path, method: str) -> None:
    rows = train(_cfg(method=method), tmp_path / "run").metrics
    assert rows[-1]["train_loss"] < 0.7 * rows[0]["train_loss"]
    assert rows[-1]["test_acc"] > 50


@pytest.mark.parametrize("kw", [{"method": "m-arwp"}, {"method": "sam"}, {"method": "m-arwp", "mix_batches": "alternate", "sigma_inc": 2.0}, {"method": "arwp", "sigma_inc": 1.0}])
def test_resume_after_crash_is_exact(tmp_path: Path, kw: dict) -> None:
    train(_cfg(**kw), tmp_path / "full")

    class Killed(Exception):
        pass

    def stop(row: dict) -> None:
        if row["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        train(_cfg(**kw), tmp_path / "crash", on_epoch=stop)
    train(_cfg(**kw), tmp_path / "crash", resume=True)
    a = read_checkpoint_file(tmp_path / "full" / "final.pt")
    b = read_checkpoint_file(tmp_path / "crash" / "final.pt")
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert [r["train_loss"] for r in a["metrics"]] == [r["train_loss"] for r in b["metrics"]]


def test_sigma_schedule_reaches_final_sigma(tmp_path: Path) -> None:
    train(_cfg(method="arwp", sigma=0.01, sigma_inc=2.0), tmp_path / "run")
    groups = read_checkpoint_file(tmp_path / "run" / "final.pt")["optimizer"]["param_groups"]
    assert abs(groups[0]["sigma"] - 0.03) < 1e-9


def test_grad_evals_per_batch() -> None:
    assert grad_evals_per_batch(_cfg(method="sgd")) == 1
    assert grad_evals_per_batch(_cfg(method="sam")) == 2
    assert grad_evals_per_batch(_cfg(method="m-arwp")) == 2
    assert grad_evals_per_batch(_cfg(method="m-arwp", mix_batches="alternate")) == 1
    assert grad_evals_per_batch(_cfg(method="arwp")) == 1


@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"method": "m-arwp", "sigma": -0.1}, "--sigma must be >= 0"),
        ({"method": "m-arwp", "lam": 1.5}, r"--lam must be in \[0, 1\]"),
        ({"method": "arwp", "beta": 1.0}, r"--beta must be in \[0, 1\)"),
        ({"method": "sam", "rho": 0.0}, "--rho must be positive"),
        ({"method": "sgd", "sigma_inc": 1.0}, "--sigma-inc is for the RWP family"),
        ({"method": "sam", "parallel_roles": True}, "--parallel-roles is for m-rwp and m-arwp"),
        ({"method": "m-arwp", "parallel_roles": True}, "needs several processes"),
    ],
)
def test_bad_method_settings(tmp_path: Path, kw: dict, pattern: str) -> None:
    with pytest.raises(FlatnessError, match=pattern):
        train(_cfg(**kw), tmp_path / "run")
    assert not (tmp_path / "run").exists()
