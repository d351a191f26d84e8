"""``flatness demo``: the comparison protocol end to end (piped), and bad inputs refused before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--seeds", "1"], "--seeds"), (["--methods", "sam"], "sgd"), (["--epochs", "0"], "--epochs"),
     (["--methods", "sgd", "sgd"], "once"), (["--seed", "-1"], "--seed")],
)
def test_bad_inputs_refused_before_training(tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "demo"
    r = run_cli("demo", "--out", str(out), *args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ") and needle in r.stderr
    assert not out.exists()


def test_force_refuses_a_folder_the_demo_did_not_make(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    r = run_cli("demo", "--out", str(out), "--force")
    assert r.returncode == 2 and "refusing" in r.stderr
    assert (out / "notes.txt").read_text() == "keep"


def test_demo_equal_updates_seeds_and_paired_differences(tmp_path: Path) -> None:
    """Piped: stage lines on stderr; report.json has seeds, equal updates, sgd-2x, mean/sd, paired intervals."""
    out = tmp_path / "demo"
    r = run_cli("demo", "--out", str(out), "--epochs", "1", "--seeds", "3", "--methods", "sgd", "sgd-2x", "m-arwp",
                "--surface", "none", "--samples", "128", "--workers", "2", "--device", "cpu", timeout=900)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(" finished: trained in ") == 9 and "demo: finished in" in r.stderr
    data = json.loads((out / "report" / "report.json").read_text())
    m = data["methods"]
    assert set(m) == {"sgd", "sgd-2x", "m-arwp"}
    assert all(row["seeds"] == 3 for row in m.values())
    assert m["m-arwp"]["updates"] == m["sgd"]["updates"] > 0 and m["sgd-2x"]["updates"] == 2 * m["sgd"]["updates"]
    assert m["m-arwp"]["grad_evals"] == m["sgd-2x"]["grad_evals"] == 2 * m["sgd"]["grad_evals"]
    for row in m.values():
        for key in ("test_acc", "lambda_max"):
            assert row[key]["mean"] is not None and row[key]["sd"] is not None
    p = m["m-arwp"]["paired"]
    assert set(p) == {"sgd", "sgd-2x"}
    assert len(p["sgd"]["test_acc"]["ci95"]) == 2 and p["sgd"]["test_acc"]["n"] == 3
    assert data["conclusion"] and any("m-arwp vs sgd-2x" in c for c in data["conclusion"])
    assert any("sigma 0.015" in n for n in data["notes"])


def test_out_below_a_file_refused_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    r = run_cli("demo", "--out", str(blocker / "demo"), "--device", "cpu")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not a folder" in r.stderr, r.stderr
    assert blocker.read_text() == "keep"


def test_one_method_demo_writes_no_empty_figure_and_says_why_nothing_is_paired(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = run_cli("demo", "--out", str(out), "--epochs", "1", "--seeds", "2", "--methods", "sgd", "--surface", "1d",
                "--samples", "64", "--workers", "2", "--device", "cpu", timeout=900)
    assert r.returncode == 0, r.stderr
    assert "No artists with labels" not in r.stderr and "Warning" not in r.stderr
    report = out / "report"
    assert not (report / "interpolation.png").exists() and (report / "training.png").exists()
    data = json.loads((report / "report.json").read_text())
    assert data["conclusion"] == ["One method only (sgd 2 seeds): there is no second method to pair it with, "
                                  "so no difference is reported."]
    assert "One method only (sgd 2 seeds)" in r.stdout
