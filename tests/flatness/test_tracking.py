"""Curvature tracking within a budget (issue 25): the plan, error bounds, exact resume, the CLI flags."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from flatness.checkpoint import read_checkpoint_file
from flatness.training import TrainConfig, train
from flatness.training.tracking import BUDGET_PRODUCTS, TIME_KEYS, calibration_updates, plan_interval
from tests.conftest import run_cli


def _cfg(**kw) -> TrainConfig:
    base = {"model": "mlp", "data": "synthetic", "epochs": 3, "batch_size": 32, "lr": 0.05, "track_samples": 64}
    return TrainConfig(**{**base, **kw})


def _rows(run: Path, *, times: bool = False) -> list[dict]:
    rows = [json.loads(x) for x in (run / "curvature.jsonl").read_text().splitlines()]
    return rows if times else [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


def test_plan_interval_spreads_the_budget_over_the_run() -> None:
    # 10 % of 1000 updates of 1 s = 100 s; the first point took 20 s; 80 s buy 10 points of 8 s over 990 updates
    # ... and 99 is rounded up onto the multiples of the first point's update (10)
    assert plan_interval(0.1, 1000, 10, 20.0, 8.0, 1.0) == 100
    assert plan_interval(0.1, 1000, 7, 20.0, 8.0, 1.0) == 105
    assert plan_interval(0.1, 1000, 10, 20.0, 8.0, 1.0, min_every=150) == 150
    assert plan_interval(0.1, 1000, 10, 95.0, 8.0, 1.0) == 0  # no room for another point
    assert plan_interval(100.0, 1000, 10, 1.0, 1.0, 1.0) == 1  # room for every update
    assert [calibration_updates(u) for u in (1, 12, 50, 640, 10_000)] == [1, 2, 2, 32, 100]


def test_capped_points_are_within_their_reported_bounds(tmp_path: Path) -> None:
    """Few products per point, warm-started: each lambda_max is within its error bound of the converged one at the same update."""
    train(_cfg(track_curvature=1), tmp_path / "exact")
    train(_cfg(track_curvature=1, track_products=5), tmp_path / "capped")
    exact, capped = _rows(tmp_path / "exact"), _rows(tmp_path / "capped")
    assert [r["step"] for r in exact] == [r["step"] for r in capped] == list(range(1, 25))
    assert all(r["converged"] for r in exact) and all(r["hvp_count"] <= 5 for r in capped[1:])
    loose = 0
    for e, c in zip(exact, capped):
        ref = e["lambda_max"]
        assert c["error_bound"] == c["residual"]
        assert e["converged"] and e["error_bound"] == e["ritz_bound"] <= 1e-5 * abs(ref)
        assert abs(c["lambda_max"] - ref) <= c["error_bound"] + e["error_bound"] + 1e-6 * abs(ref), (c, e)
        assert c["lambda_max"] <= ref + e["error_bound"] + 1e-6 * abs(ref)  # a Ritz value is a lower bound
        loose += not c["converged"]
    assert loose > 0 and sum(r["hvp_count"] for r in capped) < sum(r["hvp_count"] for r in exact)  # capped points were seen


def test_budgeted_tracking_resumes_exactly(tmp_path: Path) -> None:
    """The plan is made once and stored: a resumed run keeps it (the same timing numbers) and its warm starts."""
    cfg = _cfg(track_budget=100.0, save_every=5)  # room for every update: the schedule does not depend on timing

    class Killed(Exception):
        pass

    def stop(row: dict) -> None:
        if row["epoch"] == 2:
            raise Killed

    full = train(cfg, tmp_path / "full")
    with pytest.raises(Killed):
        train(cfg, tmp_path / "crash", on_epoch=stop)
    plan = read_checkpoint_file(tmp_path / "crash" / "checkpoints" / "last.pt")["curvature"]["plan"]
    assert plan is not None and plan["every"] == 1 and plan["start"] == calibration_updates(24) == 2
    train(cfg, tmp_path / "crash", resume=True)
    a, b = _rows(tmp_path / "full"), _rows(tmp_path / "crash")
    assert [r["step"] for r in a] == list(range(2, 25)) and a == b
    timed = _rows(tmp_path / "crash", times=True)
    assert timed[0]["plan"] == plan and not any("plan" in r for r in timed[1:])  # decided once, not again on resume
    assert a[0]["hvp_count"] > max(r["hvp_count"] for r in a[1:])  # a cold start, then warm starts within the cap
    assert all(r["hvp_count"] <= BUDGET_PRODUCTS for r in a[1:])
    extra = full.metrics[-1]["extra_fraction"]
    assert math.isfinite(extra) and extra > 0


def test_a_small_budget_measures_little(tmp_path: Path) -> None:
    res = train(_cfg(track_budget=0.01), tmp_path / "run")
    rows = _rows(tmp_path / "run", times=True)
    assert rows[0]["step"] == 2 and rows[0]["plan"]["budget"] == 0.01
    every = rows[0]["plan"]["every"]
    assert [r["step"] for r in rows[1:]] == [s for s in range(3, 25) if every and s % every == 0]
    assert len(rows) < 24 and all(math.isfinite(r["error_bound"]) for r in rows)
    assert res.metrics[-1]["extra_fraction"] > 0


def test_cli_track_curvature_alone_is_the_default_budget(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = run_cli("train", "--data", "synthetic", "--model", "mlp", "--epochs", "1", "--batch-size", "32", "--quiet", "--device", "cpu",
                "--track-curvature", "--track-samples", "64", "--out", str(run))
    assert r.returncode == 0, r.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["track_budget"] == 0.05 and config["track_curvature"] == 0 and config["track_products"] == 0
    rows = _rows(run, times=True)
    assert rows[0]["plan"]["budget"] == 0.05 and {"hvp_count", "error_bound", "residual", "converged", "extra_fraction"} <= set(rows[0])
    r = run_cli("train", "--out", str(run), "--resume", "--track-curvature", "--epochs", "1", "--quiet", "--device", "cpu")
    assert r.returncode == 0, r.stderr
