r"""Seed statistics for a comparison: mean +- sd per method, paired differences, rank correlation.

Runs are grouped by method label; two methods are paired seed by seed (same
seed = same initialization and data order). For a measure :math:`m` and
paired seeds :math:`s = 1..n`, the difference :math:`d_s = m_A(s) - m_B(s)`
gets the 95 % Student-t interval

.. math::

    \bar d \pm t_{0.975,\,n-1} \, \frac{s_d}{\sqrt n},

and "wins k/n" counts the seeds where A is better (higher accuracy, lower
loss or curvature). A difference is *within noise* when its interval
contains 0. Across many checkpoints, flatness measures are related to test
accuracy by Kendall's :math:`\tau` (as in Jiang et al. 2020, "Fantastic
Generalization Measures and Where to Find Them").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# measure key -> (title, True if higher is better)
MEASURES: dict[str, tuple[str, bool]] = {
    "test_acc": ("test accuracy (%)", True),
    "test_loss": ("test loss", False),
    "train_loss": ("train loss", False),
    "lambda_max": ("lambda_max", False),
    "trace": ("Hessian trace", False),
    "adversarial_sharpness": ("adversarial sharpness", False),
    "sharpness_max": ("random sharpness at the largest radius", False),
}
BASELINES = ("sgd", "sgd-2x")


def finite(x: Any) -> float | None:
    """``x`` as a float, or None when missing or not finite (JSON has no NaN)."""
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None where undefined)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def paired(a: dict[int, float], b: dict[int, float], higher_is_better: bool) -> dict[str, Any] | None:
    """Paired difference A - B over the seeds both have: mean, 95 % t-interval, wins.

    Returns None when fewer than two seeds pair up.
    """
    seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
    if len(seeds) < 2:
        return None
    d = [a[s] - b[s] for s in seeds]
    m, sd = mean_sd(d)
    half = t_quantile(len(d) - 1) * sd / math.sqrt(len(d))
    wins = sum(1 for x in d if (x > 0 if higher_is_better else x < 0))
    return {"seeds": seeds, "mean": m, "sd": sd, "ci95": [m - half, m + half], "wins": wins, "n": len(d),
            "within_noise": (m - half) <= 0 <= (m + half)}


def entry_values(e: dict[str, Any]) -> dict[str, float | None]:
    """The per-checkpoint measures of :data:`MEASURES` from a report entry."""
    eig = e.get("top_eigenvalues") or []
    inc = (e.get("sharpness") or {}).get("loss_increase") or []
    v = {k: finite(e.get(k)) for k in ("test_acc", "test_loss", "train_loss", "trace", "adversarial_sharpness")}
    v["lambda_max"] = finite(eig[0]) if eig else None
    v["sharpness_max"] = finite(inc[-1]) if inc else None
    return v


def group_stats(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method label: seeds, cost, mean and sd of every measure, paired differences vs the baselines."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault(e["group"], []).append(e)
    by_seed = {g: {k: {e["seed"]: entry_values(e)[k] for e in es} for k in MEASURES} for g, es in groups.items()}
    out: dict[str, dict[str, Any]] = {}
    for g, es in groups.items():
        row: dict[str, Any] = {"seeds": len(es), "seed_list": sorted(e["seed"] for e in es)}
        for key in ("updates", "grad_evals", "train_seconds"):
            vals = [e.get("cost", {}).get(key) for e in es]
            row[key] = mean_sd([finite(v) for v in vals])[0] if any(v is not None for v in vals) else None
        for k in MEASURES:
            m, sd = mean_sd([entry_values(e)[k] for e in es])
            row[k] = {"mean": m, "sd": sd}
        row["paired"] = {}
        for base in BASELINES:
            if base in groups and base != g and not (g == "sgd" and base == "sgd-2x"):
                row["paired"][base] = {k: paired(by_seed[g][k], by_seed[base][k], hib) for k, (_, hib) in MEASURES.items()}
        out[g] = row
    return out


def _diff_sentence(g: str, base: str, key: str, p: dict[str, Any], unit: str) -> str:
    title, higher = MEASURES[key]
    lo, hi = p["ci95"]
    better = (p["mean"] > 0) == higher
    head = f"{g} vs {base}, {title}: {p['mean']:+.3g}{unit} (95% CI {lo:+.3g} to {hi:+.3g}; {g} better on {p['wins']}/{p['n']} seeds)"
    if p["within_noise"]:
        return head + " - within noise: the interval contains 0."
    return head + f" - {g} is {'better' if better else 'worse'}; the interval excludes 0."


def conclusion(stats: dict[str, dict[str, Any]]) -> list[str]:
    """Sentences generated from the paired differences (never hand-written)."""
    lines = []
    for g, row in stats.items():
        for base, diffs in row.get("paired", {}).items():
            for key, unit in (("test_acc", " points"), ("lambda_max", "")):
                p = diffs.get(key)
                if p is not None:
                    lines.append(_diff_sentence(g, base, key, p, unit))
    if not lines:
        lines.append(_why_no_pairs(stats))
    return lines


def _why_no_pairs(stats: dict[str, dict[str, Any]]) -> str:
    """The reason no paired difference exists, with the seed counts that lead to it."""
    counts = ", ".join(f"{g} {r['seeds']} seed{'s' if r['seeds'] != 1 else ''}" for g, r in stats.items())
    if len(stats) == 1:
        return f"One method only ({counts}): there is no second method to pair it with, so no difference is reported."
    if not any(b in stats for b in BASELINES):
        return f"No {' or '.join(BASELINES)} baseline among the methods ({counts}): paired differences are taken against those."
    return (f"Fewer than two seeds are shared by a method and a baseline ({counts}): no difference can be told from noise; "
            "run the same seeds for every method.")


def kendall(entries: list[dict[str, Any]], target: str = "test_acc") -> dict[str, dict[str, Any]]:
    """Kendall's tau (and its p-value) between each flatness measure and ``target`` across checkpoints."""
    from scipy.stats import kendalltau

    out = {}
    for key in ("lambda_max", "trace", "adversarial_sharpness", "sharpness_max"):
        pairs = [(v[key], v[target]) for v in map(entry_values, entries) if v[key] is not None and v[target] is not None]
        if len(pairs) < 3:
            continue
        res = kendalltau([p[0] for p in pairs], [p[1] for p in pairs])
        out[key] = {"tau": finite(res.statistic), "p_value": finite(res.pvalue), "n": len(pairs)}
    return out
