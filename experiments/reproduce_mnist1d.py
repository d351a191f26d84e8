"""Reproduce the RWP paper's claims at small scale on MNIST-1D, with seeds and error bars.

Li et al., TMLR 2024, "Revisiting Random Weight Perturbation for Efficiently
Improving Generalization", claim that (i) m-RWP / m-ARWP generalize better
than SGD and match or beat SAM at similar cost, landing in flatter minima, and
(ii) plain RWP's convergence suffers at large sigma while m-RWP keeps
converging. This script trains every method on MNIST-1D (the 1-D CNN and the
MLP) over several seeds, measures the top Hessian eigenvalue and trace of each
final model, and runs a sigma sweep of RWP against m-RWP.

Budget: every method trains ``--epochs`` epochs; the table states the
gradient evaluations each one spends (SAM-type and m-RWP-type methods: two per
batch), and "sgd-2x" trains twice as many epochs, the same budget as the
two-pass methods.

Usage::

    python experiments/reproduce_mnist1d.py                       # full study (~30-60 min, 2 CPU cores)
    python experiments/reproduce_mnist1d.py --seeds 2 --epochs 5 --models cnn1d --out /tmp/r   # smoke test

Writes ``OUT/table.md``, ``OUT/results.json``, ``OUT/sigma_sweep.md`` and the
figures ``OUT/accuracy.png``, ``OUT/sigma_sweep.png`` (default OUT:
``figures/reproduce``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from flatness.analysis import prepare_analysis
from flatness.curvature import hessian_trace, top_eigenvalues
from flatness.training import TrainConfig, train
from flatness.training.loop import TrainingDiverged
from flatness.training.methods import grad_evals_per_batch

# name -> (method, hyperparameters, epoch multiplier)
METHODS: dict[str, tuple[str, dict, int]] = {
    "sgd": ("sgd", {}, 1),
    "sgd-2x": ("sgd", {}, 2),
    "sam": ("sam", {"rho": 0.05}, 1),
    "asam": ("asam", {"rho": 0.5, "adaptive_eta": 0.01}, 1),
    "delta-sam": ("delta-sam", {"rho": 0.05, "temperature": 1.0}, 1),
    "rwp": ("rwp", {"sigma": 0.01}, 1),
    "m-rwp": ("m-rwp", {"sigma": 0.03, "lam": 0.5}, 1),
    "arwp": ("arwp", {"sigma": 0.01, "eta": 0.1, "beta": 0.99}, 1),
    "m-arwp": ("m-arwp", {"sigma": 0.03, "lam": 0.5, "eta": 0.1, "beta": 0.99}, 1),
}
SWEEP_SIGMAS = (0.01, 0.03, 0.05, 0.1, 0.2, 0.3)


def run_one(name: str, model: str, seed: int, epochs: int, work: Path, extra: dict | None = None) -> dict:
    method, hyper, mult = METHODS[name]
    cfg = TrainConfig(model=model, data="mnist1d", method=method, epochs=epochs * mult, seed=seed, **{**hyper, **(extra or {})})
    t0 = time.perf_counter()
    cfg.keep_epochs = False
    try:
        result = train(cfg, work / f"{name}-{model}-{seed}-{len(list(work.iterdir()))}")
    except TrainingDiverged:
        nan = float("nan")
        return {"name": name, "model": model, "seed": seed, "epochs": cfg.epochs, "grad_evals_per_batch": grad_evals_per_batch(cfg),
                "final": None, "test_acc": nan, "test_loss": nan, "train_loss": nan, "diverged": True, "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    last = result.metrics[-1]
    clean_train_loss = _clean_train_loss(result.final)
    return {
        "name": name, "model": model, "seed": seed, "epochs": cfg.epochs,
        "grad_evals_per_batch": grad_evals_per_batch(cfg), "final": str(result.final),
        "test_acc": last["test_acc"], "test_loss": last["test_loss"], "train_loss": clean_train_loss,
        "logged_train_loss": last["train_loss"], "seconds": seconds,
    }


def _clean_train_loss(final: Path) -> float:
    """Loss of the final weights on the whole training split, eval mode, no noise.

    (The trainer's logged train loss is the first pass of each step, which for
    RWP / ARWP is taken at the perturbed weights.)
    """
    from flatness.checkpoint import load_checkpoint
    from flatness.data import load_dataset
    from flatness.training.loop import evaluate

    ckpt = load_checkpoint(final)
    ds = load_dataset("mnist1d")
    return evaluate(ckpt.model, ds.train.x, ds.train.y)[0]


def curvature(final: str, samples: int) -> tuple[float, float]:
    a = prepare_analysis(final, samples=samples, batch_size=samples)
    eig = top_eigenvalues(a.model, a.loss_fn, a.batches, k=1, tol=1e-4)
    tr = hessian_trace(a.model, a.loss_fn, a.batches, num_matvecs=30)
    return float(eig.eigenvalues[0]), float(tr.trace)


def mean_std(values: list[float]) -> str:
    diverged = sum(v != v for v in values)
    values = [v for v in values if v == v]
    if not values:
        return "diverged"
    note = f" ({diverged} diverged)" if diverged else ""
    if len(values) == 1:
        return f"{values[0]:.2f}{note}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}{note}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="figures/reproduce")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--models", nargs="+", default=["cnn1d", "mlp"])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--samples", type=int, default=1000, help="training samples for the Hessian measures")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--sweep-only", action="store_true", help="keep the table rows of OUT/results.json, redo the sweep")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier timings)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from flatness.data import load_dataset

    load_dataset("mnist1d")  # generate / warm the cache before anything is timed
    rows = json.loads((out / "results.json").read_text())["rows"] if args.sweep_only else []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for model in [] if args.sweep_only else args.models:
            for name in args.methods:
                for seed in range(args.seeds):
                    r = run_one(name, model, seed, args.epochs, work)
                    r["lambda_max"], r["trace"] = curvature(r["final"], args.samples) if r["final"] else (float("nan"), float("nan"))
                    rows.append(r)
                    print(f"{model:6s} {name:10s} seed {seed}: test acc {r['test_acc']:.2f}% "
                          f"lambda_max {r['lambda_max']:.2f} trace {r['trace']:.1f} ({r['seconds']:.1f}s)", file=sys.stderr)
        sweep = []
        if not args.no_sweep:
            for name in ("rwp", "m-rwp"):
                for sigma in SWEEP_SIGMAS:
                    for seed in range(min(args.seeds, 3)):
                        r = run_one(name, "cnn1d", seed, args.epochs, work, {"sigma": sigma})
                        r["sigma"] = sigma
                        sweep.append(r)
                        print(f"sweep {name} sigma {sigma} seed {seed}: train loss {r['train_loss']:.4f} test acc {r['test_acc']:.2f}%", file=sys.stderr)
    (out / "results.json").write_text(json.dumps({"rows": rows, "sweep": sweep, "args": vars(args), "torch": torch.__version__}, indent=2))
    write_table(rows, out, args)
    if sweep:
        write_sweep(sweep, out)
    return 0


def write_table(rows: list[dict], out: Path, args: argparse.Namespace) -> None:
    lines = [
        f"MNIST-1D, {args.seeds} seeds, {args.epochs} base epochs, lr 0.1, batch 128, weight decay 5e-4, cosine; "
        f"Hessian measures on the first {args.samples} training samples.",
        "",
        "| model | method | epochs | grad evals / batch | budget (epoch-equivalents) | test acc % | λ_max | trace | wall time / run (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in args.models:
        for name in args.methods:
            rs = [r for r in rows if r["model"] == model and r["name"] == name]
            if not rs:
                continue
            e, g = rs[0]["epochs"], rs[0]["grad_evals_per_batch"]
            lines.append(
                f"| {model} | {name} | {e} | {g} | {e * g} | {mean_std([r['test_acc'] for r in rs])} | "
                f"{mean_std([r['lambda_max'] for r in rs])} | {mean_std([r['trace'] for r in rs])} | "
                f"{statistics.mean(r['seconds'] for r in rs):.1f} |"
            )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.models), figsize=(6 * len(args.models), 4), squeeze=False)
    for ax, model in zip(axes[0], args.models):
        names = [n for n in args.methods if any(r["model"] == model and r["name"] == n for r in rows)]
        accs = [[r["test_acc"] for r in rows if r["model"] == model and r["name"] == n] for n in names]
        ax.boxplot(accs, tick_labels=names)
        ax.set_title(f"MNIST-1D {model}: test accuracy over seeds")
        ax.set_ylabel("test accuracy (%)")
        ax.tick_params(axis="x", rotation=45)
    fig.savefig(out / "accuracy.png", dpi=110, bbox_inches="tight")


def write_sweep(sweep: list[dict], out: Path) -> None:
    lines = ["| method | sigma | final train loss (clean weights, whole train split) | test acc % |", "|---|---|---|---|"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("rwp", "m-rwp"):
        xs, losses, accs = [], [], []
        for sigma in SWEEP_SIGMAS:
            rs = [r for r in sweep if r["name"] == name and r["sigma"] == sigma]
            lines.append(f"| {name} | {sigma} | {mean_std([r['train_loss'] for r in rs])} | {mean_std([r['test_acc'] for r in rs])} |")
            xs.append(sigma)
            ok = [r for r in rs if r["train_loss"] == r["train_loss"]]
            losses.append(statistics.mean(r["train_loss"] for r in ok) if ok else float("nan"))
            accs.append(statistics.mean(r["test_acc"] for r in ok) if ok else float("nan"))
        a1.plot(xs, losses, marker="o", label=name)
        a2.plot(xs, accs, marker="o", label=name)
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel(r"$\sigma$")
    a1.set_ylabel("final train loss")
    a2.set_xscale("log")
    a2.set_xlabel(r"$\sigma$")
    a2.set_ylabel("test accuracy (%)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle("MNIST-1D cnn1d: RWP vs m-RWP as sigma grows")
    fig.savefig(out / "sigma_sweep.png", dpi=110, bbox_inches="tight")
    (out / "sigma_sweep.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
