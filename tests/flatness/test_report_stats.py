"""Seed statistics of the report against independent references (scipy, plain loops)."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats as sps

from flatness.report.render import json_safe
from flatness.report.stats import conclusion, kendall, paired


def test_paired_interval_matches_scipy_ttest_rel() -> None:
    a = {0: 95.1, 1: 94.3, 2: 95.6, 3: 94.9}
    b = {0: 94.4, 1: 94.5, 2: 94.8, 3: 94.0}
    p = paired(a, b, higher_is_better=True)
    ref = sps.ttest_rel(list(a.values()), list(b.values())).confidence_interval(0.95)
    assert p["ci95"] == pytest.approx([ref.low, ref.high], rel=1e-12)
    assert p["wins"] == 3 and p["n"] == 4 and p["within_noise"] == (ref.low <= 0 <= ref.high)


def test_paired_uses_only_common_seeds_and_direction() -> None:
    p = paired({0: 1.0, 1: 2.0, 5: 9.0}, {0: 3.0, 1: 3.5, 2: 0.0}, higher_is_better=False)
    assert p["seeds"] == [0, 1] and p["wins"] == 2  # lower is better: both differences negative
    assert paired({0: 1.0}, {0: 2.0}, True) is None


def test_conclusion_says_within_noise_when_interval_contains_zero() -> None:
    noisy = paired({0: 1.0, 1: -1.0, 2: 0.5}, {0: 0.0, 1: 0.0, 2: 0.0}, True)
    clear = paired({0: 2.0, 1: 2.1, 2: 1.9}, {0: 0.0, 1: 0.0, 2: 0.0}, True)
    text = conclusion({"m": {"paired": {"sgd": {"test_acc": noisy, "lambda_max": clear}}}})
    assert "within noise" in text[0] and "excludes 0" in text[1]


def test_kendall_matches_pair_count() -> None:
    """tau-a from a plain loop over pairs (no ties) equals the report's tau."""
    lam = [3.0, 1.0, 2.0, 5.0, 4.0]
    acc = [90.0, 93.0, 91.0, 88.0, 92.0]
    entries = [{"top_eigenvalues": [l], "test_acc": t, "label": str(i)} for i, (l, t) in enumerate(zip(lam, acc))]
    conc = disc = 0
    for i in range(5):
        for j in range(i + 1, 5):
            s = (lam[i] - lam[j]) * (acc[i] - acc[j])
            conc += s > 0
            disc += s < 0
    assert kendall(entries)["lambda_max"]["tau"] == pytest.approx((conc - disc) / 10)


def test_json_safe_leaves_no_bare_nan() -> None:
    text = json.dumps(json_safe({"a": [1.0, float("nan")], "b": {"c": float("inf")}, "d": (2, -math.inf)}), allow_nan=False)
    assert json.loads(text) == {"a": [1.0, None], "b": {"c": None}, "d": [2, None]}


def test_study_picks_on_validation_accuracy_with_recipe_on_ties() -> None:
    """experiments/reproduce_mnist1d.py: the grid value with the best mean VALIDATION accuracy (test accuracy ignored)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "experiments" / "reproduce_mnist1d.py"
    spec = importlib.util.spec_from_file_location("reproduce_mnist1d", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    rows = [{"model": "cnn1d", "name": "sam", "value": v, "val_acc": a, "test_acc": t}
            for v, a, t in ((0.05, 90.0, 99.0), (0.05, 91.0, 99.0), (0.02, 92.0, 10.0), (0.02, 90.0, 10.0), (0.1, 89.0, 99.0), (0.1, 93.0, 99.0))]
    # mean validation: 0.05 -> 90.5, 0.02 -> 91.0, 0.1 -> 91.0; the tie goes to the earlier grid value; test accuracy is ignored
    assert study.pick(rows, "cnn1d", "sam") == 0.02
    rows += [{"model": "cnn1d", "name": "sam", "value": 0.05, "val_acc": 92.0, "test_acc": 0.0}]  # 0.05 -> 91.0: the recipe wins the tie
    assert study.pick(rows, "cnn1d", "sam") == 0.05
    assert study.pick(rows, "cnn1d", "sgd") is None
