"""The demo's plan: equal updates for every method, sgd-2x twice, recipes as documented, validation before training."""

from __future__ import annotations

from pathlib import Path

import pytest

from flatness.demo import DEMO_METHODS, DemoSpec, plan_runs
from flatness.errors import FlatnessError
from flatness.training import TrainConfig


def test_plan_gives_equal_updates_and_sgd_2x_twice(tmp_path: Path) -> None:
    spec = DemoSpec(epochs=7, seeds=3, methods=("sgd", "sgd-2x", "sam", "asam", "m-arwp"))
    jobs = plan_runs(spec, tmp_path)
    assert len(jobs) == 15 and {j["seed"] for j in jobs} == {0, 1, 2}
    updates = {}
    for j in jobs:
        cfg = TrainConfig.from_dict(j["config"])
        updates[j["label"]] = cfg.protocol(batches_per_epoch=32)["updates"]
    assert updates["sam"] == updates["asam"] == updates["m-arwp"] == updates["sgd"] == 7 * 32
    assert updates["sgd-2x"] == 2 * updates["sgd"]
    marwp = next(TrainConfig.from_dict(j["config"]) for j in jobs if j["label"] == "m-arwp")
    assert marwp.data_epochs == 14 and (marwp.sigma, marwp.lam, marwp.eta, marwp.beta) == (0.015, 0.5, 0.1, 0.99)
    asam = next(TrainConfig.from_dict(j["config"]) for j in jobs if j["label"] == "asam")
    assert asam.rho == 0.5 and next(TrainConfig.from_dict(j["config"]) for j in jobs if j["label"] == "sam").rho == 0.05
    assert not list(tmp_path.iterdir())  # planning writes nothing


@pytest.mark.parametrize(
    "kwargs", [{"seeds": 1}, {"epochs": 0}, {"methods": ("sam",)}, {"methods": ("sgd", "nope")}, {"workers": 0}, {"surface": "3d"}]
)
def test_spec_refuses_bad_settings(kwargs: dict) -> None:
    with pytest.raises(FlatnessError):
        DemoSpec(**kwargs)


def test_every_demo_method_states_why() -> None:
    assert all(len(why) > 20 for _, _, _, why in DEMO_METHODS.values())
