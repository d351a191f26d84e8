"""The MNIST-1D study with the comparison protocol of issue 13: equal updates, sgd-2x, validation-picked settings.

Li et al., TMLR 2024, "Revisiting Random Weight Perturbation for Efficiently
Improving Generalization", claim that m-RWP / m-ARWP generalize better than
SGD and match or beat SAM at similar cost, in flatter minima. This script
tests that on MNIST-1D (the 1-D CNN and the MLP) under one protocol:

- every method makes the same number of parameter updates (``--epochs``
  epochs' worth) with the same cosine LR schedule; the alternate m-(A)RWP
  scheme reads twice the data epochs for them; ``sgd-2x`` is SGD with twice
  the updates, the gradient budget of the two-pass methods;
- ``--val-split`` training samples are held out; each method's radius /
  sigma is picked on validation accuracy over a small grid (on
  ``--grid-seeds`` seeds), and the picked value is then trained on
  ``--seeds`` seeds whose TEST accuracy is reported (the test set never
  chooses anything);
- paired differences against sgd and sgd-2x (same seeds) with 95 %
  t-intervals (:mod:`flatness.report.stats`); the "what holds" text is
  generated from those numbers;
- SGD, SAM and m-ARWP (cnn1d, seed 0, picked values) are retrained with
  ``track_curvature`` for the curvature-over-training figure.

Runs go to ``--workers`` processes with one torch thread each.

Usage::

    python experiments/reproduce_mnist1d.py                       # the study (~20-40 min on 2 loaded cores)
    python experiments/reproduce_mnist1d.py --seeds 2 --grid-seeds 1 --epochs 3 --models cnn1d --out /tmp/r  # smoke test

Writes ``OUT/results.json``, ``OUT/table.md``, ``OUT/accuracy.png``,
``figures/curvature_training.png`` and ``docs/readme_drafts/study.md``
(default OUT: ``figures/reproduce``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

from flatness.report.stats import paired

# name -> (trainer method, fixed hyperparameters, update multiplier, grid name, grid values (first: the recipe's))
METHODS: dict[str, tuple[str, dict, int, str | None, tuple[float, ...]]] = {
    "sgd": ("sgd", {}, 1, None, ()),
    "sgd-2x": ("sgd", {}, 2, None, ()),
    "sam": ("sam", {}, 1, "rho", (0.05, 0.02, 0.1)),
    "asam": ("asam", {"adaptive_eta": 0.01}, 1, "rho", (0.5, 0.2, 1.0)),
    "delta-sam": ("delta-sam", {"temperature": 1.0}, 1, "rho", (0.05, 0.1)),
    "rwp": ("rwp", {}, 1, "sigma", (0.01, 0.005, 0.02)),
    "arwp": ("arwp", {"eta": 0.1, "beta": 0.99}, 1, "sigma", (0.01, 0.005, 0.02)),
    "m-rwp": ("m-rwp", {"lam": 0.5, "mix_batches": "alternate"}, 1, "sigma", (0.015, 0.03, 0.05)),
    "m-arwp": ("m-arwp", {"lam": 0.5, "eta": 0.1, "beta": 0.99, "mix_batches": "alternate"}, 1, "sigma", (0.015, 0.03, 0.05)),
}
TRACKED = ("sgd", "sam", "m-arwp")
REPO = Path(__file__).resolve().parents[1]


def _init() -> None:
    import torch

    torch.set_num_threads(1)


def run_one(job: dict) -> dict:
    """Train one (method, model, seed, value); return validation/test accuracy, cost and (optionally) curvature."""
    from flatness.training import TrainConfig, train

    method, fixed, mult, knob, _ = METHODS[job["name"]]
    hyper = {**fixed, **({knob: job["value"]} if knob else {})}
    extra = {"track_curvature": job["track"]} if job.get("track") else {}
    cfg = TrainConfig(model=job["model"], data="mnist1d", method=method, epochs=job["epochs"] * mult, seed=job["seed"],
                      val_split=job["val_split"], keep_epochs=False, **hyper, **extra)
    t0 = time.perf_counter()
    result = train(cfg, Path(job["work"]) / job["tag"], device="cpu", quiet=True)
    row = {k: job[k] for k in ("name", "model", "seed", "value", "phase")}
    last = result.metrics[-1]
    conf = json.loads((Path(job["work"]) / job["tag"] / "config.json").read_text())
    row.update(val_acc=last.get("val_acc"), test_acc=last["test_acc"], train_loss=last["train_loss"],
               updates=conf.get("updates"), grad_evals=conf.get("updates", 0) * conf.get("grad_evals_per_update", 1),
               seconds=time.perf_counter() - t0)
    if job["phase"] == "final":
        row["lambda_max"], row["trace"] = _curvature(result.final, job["samples"])
    if job.get("track"):
        track = Path(job["work"]) / job["tag"] / "curvature.jsonl"
        row["track"] = [json.loads(x) for x in track.read_text().splitlines() if x.strip()]
        row["lr"] = cfg.lr
        row["curvature_fraction"] = last.get("curvature_fraction")
    return row


def _curvature(final: Path, samples: int) -> tuple[float, float]:
    """lambda_max and trace of the final weights on the first ``samples`` training samples, one operator."""
    from flatness.analysis import prepare_analysis
    from flatness.curvature import HessianOperator, hutchpp_trace, lanczos_top_eigs

    a = prepare_analysis(final, samples=samples, batch_size=samples)
    H = HessianOperator(a.model, a.loss_fn, a.batches)
    return float(lanczos_top_eigs(H, 1, 1e-4).eigenvalues[0]), float(hutchpp_trace(H, 30).trace)


def _pool_map(jobs: list[dict], workers: int, log_every: str) -> list[dict]:
    rows = []
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(workers, initializer=_init) as pool:
        for r in pool.imap_unordered(run_one, jobs):
            rows.append(r)
            print(f"[{log_every} {len(rows)}/{len(jobs)} {time.perf_counter() - t0:.0f}s] {r['model']} {r['name']} "
                  f"{r['value']} seed {r['seed']}: val {r['val_acc']} test {r['test_acc']:.2f}", file=sys.stderr, flush=True)
        pool.close()
        pool.join()
    return rows


def pick(grid_rows: list[dict], model: str, name: str) -> float | None:
    """The grid value with the best mean validation accuracy (ties: the recipe's value, listed first)."""
    values = METHODS[name][4]
    if not values:
        return None
    means = {v: statistics.mean(r["val_acc"] for r in grid_rows if r["model"] == model and r["name"] == name and r["value"] == v)
             for v in values}
    return max(values, key=lambda v: (means[v], -values.index(v)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="figures/reproduce")
    p.add_argument("--epochs", type=int, default=40, help="epochs' worth of updates for every method")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--grid-seeds", type=int, default=2)
    p.add_argument("--val-split", type=int, default=500)
    p.add_argument("--models", nargs="+", default=["cnn1d", "mlp"])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--samples", type=int, default=1000, help="training samples for the Hessian measures")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--track-every", type=int, default=32, help="updates between two curvature measurements")
    p.add_argument("--figures", default=str(REPO / "figures"))
    p.add_argument("--draft", default=str(REPO / "docs" / "readme_drafts" / "study.md"))
    p.add_argument("--render-only", action="store_true", help="redo table, figures and text from OUT/results.json")
    p.add_argument("--demo-note", default=None, help="a measured `flatness demo` wall time to state in the text (with --render-only)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        results = json.loads((out / "results.json").read_text())
        keep = {"figures": args.figures, "draft": args.draft, "demo_note": args.demo_note}
        return render(results, out, argparse.Namespace(**{**results["args"], **keep}))
    from flatness.data import load_dataset

    load_dataset("mnist1d")  # generate / warm the cache once, before the workers start
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = {"epochs": args.epochs, "val_split": args.val_split, "work": tmp, "samples": args.samples}
        grid_jobs = [{**base, "name": n, "model": m, "seed": s, "value": v, "phase": "grid", "tag": f"g-{m}-{n}-{v}-{s}"}
                     for m in args.models for n in args.methods for v in METHODS[n][4] if len(METHODS[n][4]) > 1
                     for s in range(args.grid_seeds)]
        grid = _pool_map(sorted(grid_jobs, key=lambda j: j["name"] != "delta-sam"), args.workers, "grid")
        picked = {m: {n: pick(grid, m, n) for n in args.methods} for m in args.models}
        final_jobs = [{**base, "name": n, "model": m, "seed": s, "value": picked[m][n], "phase": "final", "tag": f"f-{m}-{n}-{s}"}
                      for m in args.models for n in args.methods for s in range(args.seeds)]
        final_jobs += [{**base, "name": n, "model": args.models[0], "seed": 0, "value": picked[args.models[0]][n],
                        "phase": "track", "track": args.track_every, "tag": f"t-{n}"} for n in TRACKED if n in args.methods]
        final = _pool_map(sorted(final_jobs, key=lambda j: j["name"] != "delta-sam"), args.workers, "final")
    wall = time.perf_counter() - t_start
    results = {"args": vars(args), "picked": picked, "grid": grid, "rows": [r for r in final if r["phase"] == "final"],
               "tracks": [r for r in final if r["phase"] == "track"], "wall_seconds": wall}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return render(results, out, args)


def render(results: dict, out: Path, args: argparse.Namespace) -> int:
    """Table, accuracy figure, curvature figure and the README text, all from ``results``."""
    table = write_table(results, out, args)
    curvature_figure(results["tracks"], Path(args.figures) / "curvature_training.png")
    Path(args.draft).parent.mkdir(parents=True, exist_ok=True)
    Path(args.draft).write_text(study_text(results, table, args))
    return 0


def _ms(values: list[float | None], digits: int = 2) -> str:
    vals = [v for v in values if v is not None]
    if len(vals) < 2:
        return f"{vals[0]:.{digits}f}" if vals else "-"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def _diff(rows: list[dict], model: str, a: str, b: str, key: str = "test_acc", higher: bool = True) -> dict | None:
    pick_ = lambda n: {r["seed"]: r[key] for r in rows if r["model"] == model and r["name"] == n}  # noqa: E731
    return paired(pick_(a), pick_(b), higher)


def _fmt_diff(p: dict | None) -> str:
    if p is None:
        return "-"
    return f"{p['mean']:+.2f} [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}] {p['wins']}/{p['n']}"


def write_table(results: dict, out: Path, args: argparse.Namespace) -> str:
    rows = results["rows"]
    lines = [
        f"MNIST-1D, {args.seeds} seeds, {args.epochs} epochs' worth of updates for every method (sgd-2x: twice), lr 0.1, "
        f"batch 128, weight decay 5e-4, cosine; {args.val_split} training samples held out for validation; radius / sigma "
        f"picked on validation accuracy ({args.grid_seeds} seeds); Hessian measures on the first {args.samples} training samples. "
        "Differences: paired by seed, mean [95% t-interval] and seeds won.",
        "",
        "| model | method | picked | updates | grad evals | test acc % | Δ vs sgd | Δ vs sgd-2x | λ_max | trace | s / run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in args.models:
        for name in args.methods:
            rs = [r for r in rows if r["model"] == model and r["name"] == name]
            if not rs:
                continue
            knob = METHODS[name][3]
            chosen = f"{knob} {results['picked'][model][name]}" if knob else "-"
            d1 = _fmt_diff(_diff(rows, model, name, "sgd")) if name != "sgd" else "-"
            d2 = _fmt_diff(_diff(rows, model, name, "sgd-2x")) if name not in ("sgd", "sgd-2x") else "-"
            lines.append(f"| {model} | {name} | {chosen} | {rs[0]['updates']} | {rs[0]['grad_evals']} | "
                         f"{_ms([r['test_acc'] for r in rs])} | {d1} | {d2} | {_ms([r['lambda_max'] for r in rs], 3)} | "
                         f"{_ms([r['trace'] for r in rs], 1)} | {statistics.mean(r['seconds'] for r in rs):.1f} |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    accuracy_figure(rows, args, out / "accuracy.png")
    return table


def accuracy_figure(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.models), figsize=(6 * len(args.models), 4), squeeze=False)
    for ax, model in zip(axes[0], args.models):
        names = [n for n in args.methods if any(r["model"] == model and r["name"] == n for r in rows)]
        accs = [[r["test_acc"] for r in rows if r["model"] == model and r["name"] == n] for n in names]
        ax.boxplot(accs, tick_labels=names)
        ax.set_title(f"MNIST-1D {model}: test accuracy over seeds (equal updates)", fontsize=10)
        ax.set_ylabel("test accuracy (%)")
        ax.tick_params(axis="x", rotation=45)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def curvature_figure(tracks: list[dict], path: Path) -> None:
    """lambda_max against updates for the tracked runs, with SGD's 2/lr stability threshold."""
    if not tracks:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in tracks:
        ax.plot([t["step"] for t in r["track"]], [t["lambda_max"] for t in r["track"]], label=f"{r['name']} ({r['model']}, seed 0)")
    lr = next((r["lr"] for r in tracks if r["name"] == "sgd"), None)
    if lr:
        ax.axhline(2 / lr, color="k", ls="--", lw=0.8, label=f"2/lr = {2 / lr:g} (gradient-descent stability threshold, peak lr)")
        ax.axhline(3.8 / lr, color="k", ls=":", lw=0.8, label=f"(2+2·0.9)/lr = {3.8 / lr:g} (with momentum 0.9)")
    ax.set_yscale("log")
    ax.set_xlabel("updates")
    ax.set_ylabel(r"$\lambda_{max}$ (first 256 training samples, eval mode)")
    ax.set_title("MNIST-1D: curvature during training (cosine lr)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def _verdict(p: dict | None, what: str) -> str:
    if p is None:
        return f"{what}: not enough paired seeds"
    word = "within noise (interval contains 0)" if p["within_noise"] else ("better" if p["mean"] > 0 else "worse") + " (interval excludes 0)"
    return f"{what}: {p['mean']:+.2f} points [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}], wins {p['wins']}/{p['n']} - {word}"


def study_text(results: dict, table: str, args: argparse.Namespace) -> str:
    """The README section: protocol, table, generated "what holds", curvature figure in numbers."""
    rows = results["rows"]
    out = ["## MNIST-1D study (equal updates, validation-picked settings)", "",
           "Protocol: every method makes the same number of parameter updates with the same learning-rate schedule; the "
           "alternate m-(A)RWP scheme reads two data epochs per epoch of updates (as the official script does); sgd-2x is "
           "SGD with twice the updates, i.e. the two-pass methods' gradient budget. Radius / sigma per method picked on a "
           "held-out validation split, never on the test set; test accuracy of the picked value over seeds; differences "
           "paired by seed with 95 % t-intervals.", "", table, "### What holds (generated from the numbers above)", ""]
    for model in args.models:
        for name in args.methods:
            if name in ("sgd",):
                continue
            for base in ("sgd", "sgd-2x"):
                if base == name or (name == "sgd-2x" and base == "sgd-2x"):
                    continue
                out.append(f"- {model}, {_verdict(_diff(rows, model, name, base), f'{name} vs {base}')}")
    wins = [(m, n) for m in args.models for n in args.methods if n not in ("sgd", "sgd-2x")
            and (p := _diff(rows, m, n, "sgd-2x")) is not None and not p["within_noise"] and p["mean"] > 0]
    out += ["", "Methods whose test accuracy beats sgd-2x with an interval that excludes 0: "
            + (", ".join(f"{n} ({m})" for m, n in wins) if wins else "none") + "."]
    flatter2 = [(m, n) for m in args.models for n in args.methods if n not in ("sgd", "sgd-2x")
                and (p := _diff(rows, m, n, "sgd-2x", "lambda_max", False)) is not None and not p["within_noise"] and p["mean"] < 0]
    out += ["Methods with a lower lambda_max than sgd-2x (interval excludes 0): "
            + (", ".join(f"{n} ({m})" for m, n in flatter2) if flatter2 else "none") + "."]
    flatter = [(m, n) for m in args.models for n in args.methods if n not in ("sgd", "sgd-2x")
               and (p := _diff(rows, m, n, "sgd", "lambda_max", False)) is not None and not p["within_noise"] and p["mean"] < 0]
    out += ["Methods with a lower lambda_max than sgd (interval excludes 0): "
            + (", ".join(f"{n} ({m})" for m, n in flatter) if flatter else "none") + "."]
    if results["tracks"]:
        out += ["", "### Curvature during training", "", "![curvature during training](figures/curvature_training.png)", ""]
        for r in results["tracks"]:
            lam = [t["lambda_max"] for t in r["track"]]
            frac = r.get("curvature_fraction")
            out.append(f"- {r['name']}: lambda_max peaks at {max(lam):.1f} (update {r['track'][lam.index(max(lam))]['step']}), "
                       f"ends at {lam[-1]:.2f}; measuring took {100 * frac:.1f} % of training time" if frac is not None else
                       f"- {r['name']}: lambda_max peaks at {max(lam):.1f}, ends at {lam[-1]:.2f}")
        out.append(f"- The stability threshold at the peak learning rate 0.1 is 2/lr = {2 / 0.1:g} for plain gradient descent and "
                   f"(2 + 2 * 0.9)/lr = {3.8 / 0.1:g} with momentum 0.9 (Cohen et al. 2021); the cosine schedule raises both as "
                   "the learning rate decays.")
        sgd = next((r for r in results["tracks"] if r["name"] == "sgd"), None)
        if sgd:
            peak = max(t["lambda_max"] for t in sgd["track"])
            out.append(f"- SGD's lambda_max peaks at {peak:.1f} = {100 * peak / 20:.0f} % of 2/lr: "
                       + ("it stays below the edge of stability here rather than hovering at it." if peak < 0.9 * 20
                          else "it reaches the edge of stability."))
    out += ["", "The RWP / m-RWP sigma sweep (figures/reproduce/sigma_sweep.*) is from the earlier protocol and was not rerun."]
    grids = "; ".join(f"{n} {METHODS[n][3]} {{{', '.join(map(str, METHODS[n][4]))}}}" for n in args.methods if len(METHODS[n][4]) > 1)
    out += ["", f"Grids (first value: the published recipe, kept on ties): {grids}."]
    if getattr(args, "demo_note", None):
        out += ["", f"Demo wall time: {args.demo_note}"]
    out += ["", f"Study wall time: {results['wall_seconds'] / 60:.0f} min with {args.workers} worker processes "
            "(one torch thread each) on a 2-core machine shared with other jobs."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
