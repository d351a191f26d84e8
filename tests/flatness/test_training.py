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


# ---------------------------------------------------------------- issue 13: the comparison protocol
def test_alternate_scheme_makes_as_many_updates_as_sgd(tmp_path: Path) -> None:
    """``--epochs E``: E epochs' worth of updates for every method; alternate m-ARWP reads 2E data epochs."""
    sgd = train(_cfg(epochs=2), tmp_path / "sgd")
    alt = train(_cfg(epochs=2, method="m-arwp", mix_batches="alternate", sigma=0.01), tmp_path / "alt")
    a, b = read_checkpoint_file(sgd.final), read_checkpoint_file(alt.final)
    assert a["step"] == b["step"] == 16  # 2 epochs x 8 batches
    assert b["optimizer"]["wrapper"]["num_updates"] == 16
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 16  # the LR schedule stepped per update
    assert [r["epoch"] for r in alt.metrics] == [1, 2, 3, 4] and [r["step"] for r in alt.metrics] == [4, 8, 12, 16]
    assert alt.metrics[-1]["lr"] == sgd.metrics[-1]["lr"]
    ca, cb = (json.loads((tmp_path / n / "config.json").read_text()) for n in ("sgd", "alt"))
    assert (ca["updates"], ca["data_epochs"], ca["grad_evals_per_update"]) == (16, 2, 1)
    assert (cb["updates"], cb["data_epochs"], cb["grad_evals_per_update"]) == (16, 4, 2)


def test_validation_split_is_disjoint_from_the_training_samples_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flatness.data import load_dataset
    from flatness.training import loop

    seen: list[torch.Tensor] = []
    real = loop._Closure

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, par, batch, spec, *rest) -> None:  # noqa: ANN001, ANN002
            seen.append(batch[0].clone())
            super().__init__(par, batch, spec, *rest)

    monkeypatch.setattr(loop, "_Closure", Recording)
    res = train(_cfg(epochs=2, val_split=40, seed=3), tmp_path / "run")
    train_x = load_dataset("synthetic").train.x
    used = torch.cat(seen)
    train_idx, val_idx = loop.split_validation(train_x.shape[0], 40, 3)
    assert val_idx.numel() == 40 and set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    # every sample trained on is a training-split row, none a validation row (compared by content)
    val_rows = {tuple(r.tolist()) for r in train_x[val_idx]}
    used_rows = {tuple(r.tolist()) for r in used}
    assert used_rows and used_rows.isdisjoint(val_rows)
    assert used.shape[0] == 2 * (train_x.shape[0] - 40)  # every other sample, once per epoch
    assert json.loads((tmp_path / "run" / "config.json").read_text())["val_split"] == 40
    assert all({"val_loss", "val_acc"} <= set(r) for r in res.metrics)
    # the split depends on the seed only, not on the method
    other = loop.split_validation(train_x.shape[0], 40, 3)[1]
    assert torch.equal(other, val_idx) and not torch.equal(loop.split_validation(train_x.shape[0], 40, 4)[1], val_idx)


def test_asam_groups_follow_the_official_code() -> None:
    """SamsungLabs/ASAM scales every parameter whose name contains 'weight' (BatchNorm weights too), never a bias."""
    from flatness.models import build_model
    from flatness.training.methods import get_method

    model = build_model("resnet18", num_classes=10)
    opt = get_method("asam").build(model, TrainConfig(method="asam"))
    adaptive = {id(p): g.get("adaptive", True) for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert any(n.endswith("weight") and p.ndim == 1 for n, p in names.items()), "the model needs a BatchNorm weight"
    for name, p in names.items():
        assert adaptive[id(p)] is ("weight" in name), name
    assert opt.param_groups[0]["rho"] == 0.5  # the official ASAM radius is the default


def test_official_defaults() -> None:
    c = TrainConfig(method="m-arwp")
    assert (c.sigma, c.lam, c.eta, c.beta) == (0.015, 0.5, 0.1, 0.99)
    assert TrainConfig(method="asam").rho == 0.5 and TrainConfig(method="sam").rho == 0.05
    assert TrainConfig(method="asam", rho=0.1).rho == 0.1


def test_incstd_follows_the_official_schedule(tmp_path: Path) -> None:
    """nblt/mARWP ``--incstd``: CosineInc(base=weight_decay, inc=sigma/weight_decay - 1) over the run's steps."""
    import math

    cfg = _cfg(method="arwp", sigma=0.02, weight_decay=1e-3, incstd=True, epochs=2)
    res = train(cfg, tmp_path / "run")
    opt_state = read_checkpoint_file(res.final)["optimizer"]
    total = 16

    def official(step: int) -> float:  # transcribed from train_marwp.py's CosineInc
        scale = -math.cos(step * math.pi / total) * 0.5 + 0.5
        return 1e-3 * (scale * (0.02 / 1e-3 - 1) + 1)

    assert opt_state["param_groups"][0]["sigma"] == pytest.approx(official(total), rel=1e-12)
    assert opt_state["param_groups"][0]["initial_sigma"] == pytest.approx(official(0))
    with pytest.raises(FlatnessError, match="--incstd and --sigma-inc"):
        _cfg(method="arwp", incstd=True, sigma_inc=1.0)
    with pytest.raises(FlatnessError, match="--incstd is for the RWP family"):
        train(_cfg(method="sam", incstd=True), tmp_path / "x")


# ---------------------------------------------------------------- issue 12: settings validated once
def test_config_file_unknown_key_is_named() -> None:
    good = TrainConfig().to_dict()
    assert TrainConfig.from_dict({**good, "updates": 5, "data_epochs": 1, "grad_evals_per_update": 1}) == TrainConfig()
    with pytest.raises(FlatnessError, match="unknown setting 'learning_rate'"):
        TrainConfig.from_dict({**good, "learning_rate": 0.1})
    with pytest.raises(FlatnessError, match="setting 'epochs' must be a int"):
        TrainConfig.from_dict({**good, "epochs": "3"})


@pytest.mark.parametrize("kw, pattern", [({"seed": 10**20}, "--seed"), ({"seed": -1}, "--seed"), ({"save_every": -1}, "--save-every"),
                                         ({"val_split": 2**64}, "--val-split"), ({"epochs": True}, "--epochs"),
                                         ({"track_trace": True}, "--track-curvature")])
def test_config_checks_ranges_once(kw: dict, pattern: str) -> None:
    with pytest.raises(FlatnessError, match=pattern):
        _cfg(**kw)


def test_config_is_frozen() -> None:
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        _cfg().lr = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------- issue 17: curvature during training
def _curv_rows(run: Path) -> list[dict]:
    from flatness.training.tracking import TIME_KEYS

    return [{k: v for k, v in json.loads(x).items() if k not in TIME_KEYS} for x in (run / "curvature.jsonl").read_text().splitlines()]


def test_tracked_curvature_survives_resume_exactly(tmp_path: Path) -> None:
    cfg = _cfg(epochs=3, batch_size=64, track_curvature=2, track_samples=64, save_every=3)
    full = train(cfg, tmp_path / "full")

    class Killed(Exception):
        pass

    def stop(row: dict) -> None:
        if row["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, tmp_path / "crash", on_epoch=stop)
    train(cfg, tmp_path / "crash", resume=True)
    a, b = _curv_rows(tmp_path / "full"), _curv_rows(tmp_path / "crash")
    assert [r["step"] for r in a] == [2, 4, 6, 8, 10, 12] and a == b
    assert all(r["hvp_count"] < a[0]["hvp_count"] for r in a[1:])  # warm starts need fewer products
    assert 0 < full.metrics[-1]["curvature_fraction"] < 1
    plain = train(_cfg(epochs=3, batch_size=64, save_every=3), tmp_path / "plain")
    sa, sb = read_checkpoint_file(full.final)["state_dict"], read_checkpoint_file(plain.final)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # measuring does not change the training path


def test_tracked_trace_is_recorded(tmp_path: Path) -> None:
    import math

    train(_cfg(epochs=1, batch_size=64, track_curvature=2, track_trace=True, track_samples=64), tmp_path / "run")
    rows = _curv_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [2, 4]
    assert all(math.isfinite(r["trace"]) and r["trace"] > 0 for r in rows)  # cross-entropy at init: positive curvature


def test_run_of_an_older_version_resumes(tmp_path: Path) -> None:
    """config.json / last.pt written before val_split, incstd, track_* existed: missing settings count as defaults."""
    run = tmp_path / "run"

    class Killed(Exception):
        pass

    def stop(row: dict) -> None:
        raise Killed

    with pytest.raises(Killed):
        train(_cfg(epochs=2), run, on_epoch=stop)
    new_keys = ("val_split", "incstd", "track_curvature", "track_trace", "track_samples", "updates", "data_epochs", "grad_evals_per_update")
    old = {k: v for k, v in json.loads((run / "config.json").read_text()).items() if k not in new_keys}
    (run / "config.json").write_text(json.dumps(old))
    res = train(TrainConfig.from_dict(old), run, resume=True)
    assert [r["epoch"] for r in res.metrics] == [1, 2]
