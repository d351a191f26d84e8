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
