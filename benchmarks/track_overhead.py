"""Benchmark: curvature tracking within a budget against untracked training (issue 25).

For each model, in one process and with the runs taking turns (so a change
of load hits both alike), ``flatness.training.train`` runs

- ``untracked``: no curvature tracking;
- ``tracked``: ``--track-curvature`` with the default budget (5 % extra),
  i.e. ``TrainConfig(track_budget=0.05)``: the interval and the products per
  point are chosen once from the first updates and the first point;

each ``--repeat`` times (default 5), timed in process CPU time (one thread: the thread
time of the work; unaffected by other processes on a shared machine). The
measured extra cost is (median tracked - median untracked) / median
untracked (``extra_min``: the same from the fastest run of each side, the
least disturbed by other processes); beside it the run's own
``extra_fraction`` (measuring time over the time of everything else, on the
tracker's clock) as written in metrics.jsonl. Two separate runs differ by a
few per cent on a loaded machine even in CPU time, so the external numbers
are a check of the in-run one, not a more precise measure.

Then the accuracy of the budgeted curve: one more run tracks exactly at
every K-th update (``--track-curvature K``, today's full convergence to a
relative 1e-6; K = the budgeted run's first point, whose multiples hold all
its points). Training does not depend on tracking (bitwise), so the two runs
measure the same weights; every budgeted point must be within its reported
``error_bound`` (plus the reference's own) of the exact value.

    python benchmarks/track_overhead.py                 # MNIST-1D CNN and a 128-channel CNN, 40 epochs (1,280 updates)
    python benchmarks/track_overhead.py --quick         # seconds: the smoke test's settings
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from flatness.training import TrainConfig, train
from flatness.training.config import TRACK_BUDGET_DEFAULT

MODELS = {  # name -> TrainConfig fields
    "cnn1d": {"model": "cnn1d", "data": "mnist1d"},
    "cnn1d-128": {"model": "cnn1d", "data": "mnist1d", "model_kwargs": {"channels": 128}},
    "mlp-synthetic": {"model": "mlp", "data": "synthetic"},  # --quick
}
COLUMNS = ("model", "params", "updates", "untracked_s", "tracked_s", "extra_measured", "extra_min", "extra_fraction_in_run", "points",
           "every", "products_per_point", "exact_products_per_point", "within_bound", "max_rel_err", "max_rel_bound")


def _rows(run: Path, name: str) -> list[dict[str, Any]]:
    path = run / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _timed(cfg: TrainConfig, out: Path) -> tuple[float, Path]:
    t = time.process_time()
    train(cfg, out, device="cpu")
    return time.process_time() - t, out


def measure(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    base = TrainConfig(**MODELS[name], epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, track_samples=args.samples, seed=0)
    untracked = base
    tracked = TrainConfig(**{**base.to_dict(), "track_budget": args.budget})
    train(TrainConfig(**{**base.to_dict(), "epochs": 1}), tmp / f"{name}-warmup", device="cpu")  # first-call costs, untimed
    times: dict[str, list[float]] = {"untracked": [], "tracked": []}
    last: Path | None = None
    for r in range(args.repeat):
        order = [("untracked", untracked), ("tracked", tracked)]
        for label, cfg in order if r % 2 == 0 else order[::-1]:
            seconds, out = _timed(cfg, tmp / f"{name}-{label}-{r}")
            times[label].append(seconds)
            if label == "tracked":
                last = out
    assert last is not None
    rows = _rows(last, "curvature.jsonl")
    plan = rows[0]["plan"]
    start = int(plan["start"])
    ref_cfg = TrainConfig(**{**base.to_dict(), "track_curvature": start})
    train(ref_cfg, tmp / f"{name}-exact", device="cpu")
    exact = {r["step"]: r for r in _rows(tmp / f"{name}-exact", "curvature.jsonl")}
    within, rel_err, rel_bound = 0, 0.0, 0.0
    for r in rows:
        e = exact[r["step"]]
        err = abs(r["lambda_max"] - e["lambda_max"])
        within += err <= r["error_bound"] + e["error_bound"] + 1e-6 * abs(e["lambda_max"])
        rel_err = max(rel_err, err / abs(e["lambda_max"]))
        rel_bound = max(rel_bound, r["error_bound"] / abs(e["lambda_max"]))
    t_u, t_t = statistics.median(times["untracked"]), statistics.median(times["tracked"])
    metrics = _rows(last, "metrics.jsonl")
    params = sum(p.numel() for p in torch.load(last / "final.pt", weights_only=True)["state_dict"].values())
    return {
        "model": name, "params": params, "updates": metrics[-1]["step"], "untracked_s": t_u, "tracked_s": t_t,
        "extra_measured": (t_t - t_u) / t_u, "extra_min": min(times["tracked"]) / min(times["untracked"]) - 1,
        "extra_fraction_in_run": metrics[-1]["extra_fraction"], "points": len(rows),
        "every": plan["every"], "products_per_point": statistics.mean(r["hvp_count"] for r in rows),
        "exact_products_per_point": statistics.mean(exact[r["step"]]["hvp_count"] for r in rows),
        "within_bound": f"{within}/{len(rows)}", "max_rel_err": rel_err, "max_rel_bound": rel_bound,
        "plan": plan, "times": times, "curve": [(r["step"], r["lambda_max"], r["error_bound"], exact[r["step"]]["lambda_max"]) for r in rows],
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=["cnn1d", "cnn1d-128"])
    p.add_argument("--epochs", type=int, default=40, help="epochs of 32 updates (MNIST-1D, batch 128)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--samples", type=int, default=256, help="--track-samples")
    p.add_argument("--budget", type=float, default=TRACK_BUDGET_DEFAULT)
    p.add_argument("--repeat", type=int, default=5, help="timed runs of each side (median and min)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds): synthetic MLP, 2 epochs, 1 repeat")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.epochs, args.repeat, args.samples = ["mlp-synthetic"], 2, 1, 64
    torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"process CPU time, budget {args.budget:g}, {args.epochs} epochs, batch {args.batch_size}, "
          f"{args.samples} tracked samples, {args.repeat} runs of each side")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(name, args, Path(tmp)) for name in args.models]
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---" for _ in COLUMNS) + "|")
    for r in results:
        print("| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |")
    for r in results:
        pl = r["plan"]
        print(f"{r['model']}: plan every {pl['every']} updates from update {pl['start']}, at most {pl['products']} products; "
              f"t_update {1e3 * pl['t_update']:.2f} ms, t_product {1e3 * pl['t_product']:.2f} ms, first point {1e3 * pl['first_cost']:.1f} ms")
        print(f"{r['model']}: (step, lambda_max, error_bound, exact) " + ", ".join(f"({s}, {a:.4g}, {b:.2g}, {c:.4g})" for s, a, b, c in r["curve"]))
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; total {time.perf_counter() - start:.0f} s wall")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
