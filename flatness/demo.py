"""The offline demo behind ``flatness demo``: several methods x seeds on MNIST-1D, then one report.

Protocol (issue 13, the one every comparison in this project uses):

- Every method makes the same number of parameter **updates** with the same
  learning-rate schedule: ``--epochs E`` means E epochs' worth of updates
  for every method; the alternate m-(A)RWP scheme (clean gradient on batch
  t, perturbed on batch t+1, as in the official nblt/mARWP script) reads 2E
  data epochs for those updates.
- ``sgd-2x`` is SGD with twice the updates: the gradient budget of the
  two-pass methods (SAM, ASAM, m-ARWP), so a method must beat more SGD, not
  only equal SGD, to show its perturbation is worth its cost.
- Each method runs ``seeds`` seeds (same seeds for every method, so seeds
  pair up), in parallel worker processes with one torch thread each; the
  report gives mean +- sd, paired differences against ``sgd`` and
  ``sgd-2x`` with a 95 % t-interval and wins k/n, and a conclusion
  generated from those numbers.

Hyperparameters (the published recipes, not tuned on this test set):
m-ARWP sigma 0.015, lam 0.5, eta 0.1, beta 0.99 (Li et al. 2024, official
code defaults); SAM rho 0.05 (Foret et al. 2021); ASAM rho 0.5 with
adaptive eta 0.01 (Kwon et al. 2021); SGD lr 0.1, momentum 0.9, weight
decay 5e-4, batch 128, cosine schedule (the trainer's defaults).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatness.errors import FlatnessError

LOG = logging.getLogger("flatness")

# label -> (trainer method, hyperparameters, update multiplier, why)
DEMO_METHODS: dict[str, tuple[str, dict[str, Any], int, str]] = {
    "sgd": ("sgd", {}, 1, "the baseline: lr 0.1, momentum 0.9, weight decay 5e-4, cosine schedule"),
    "sgd-2x": ("sgd", {}, 2, "SGD with twice the updates = the two-pass methods' gradient budget"),
    "sam": ("sam", {"rho": 0.05}, 1, "rho 0.05, Foret et al. 2021 (CIFAR recipe)"),
    "asam": ("asam", {"rho": 0.5, "adaptive_eta": 0.01}, 1, "rho 0.5, eta 0.01, Kwon et al. 2021 official recipe"),
    "m-arwp": ("m-arwp", {"sigma": 0.015, "lam": 0.5, "eta": 0.1, "beta": 0.99, "mix_batches": "alternate"}, 1,
               "sigma 0.015, lam 0.5, eta 0.1, beta 0.99, alternate batches: official nblt/mARWP defaults"),
}
DEFAULT_METHODS = ("sgd", "sgd-2x", "sam", "m-arwp")  # asam with --methods (adds ~25 % to the run time)


@dataclass(frozen=True)
class DemoSpec:
    """Settings of ``flatness demo``; validated once, before anything is trained.

    Attributes:
        epochs: epochs' worth of parameter updates for every method (sgd-2x: twice).
        seeds: seeds per method (0 .. seeds-1 shifted by ``first_seed``); >= 2 to pair.
        methods: labels from :data:`DEMO_METHODS`; must include ``sgd``.
        workers: parallel processes (default: the CPU cores this process may use).
        samples: training samples the analysis uses.
        surface: ``"2d"``, ``"1d"`` or ``"none"`` (one surface per method, first seed).
    """

    epochs: int = 60
    seeds: int = 3
    methods: tuple[str, ...] = DEFAULT_METHODS
    workers: int | None = None
    samples: int = 1000
    surface: str = "2d"
    first_seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise FlatnessError(f"--epochs must be a positive integer, got {self.epochs}")
        if not isinstance(self.seeds, int) or self.seeds < 2:
            raise FlatnessError(f"--seeds must be at least 2 (paired differences need two seeds), got {self.seeds}")
        unknown = [m for m in self.methods if m not in DEMO_METHODS]
        if unknown:
            raise FlatnessError(f"unknown demo method {unknown[0]!r}; expected some of {', '.join(DEMO_METHODS)}")
        if "sgd" not in self.methods or len(set(self.methods)) != len(self.methods):
            raise FlatnessError(f"--methods must name each method once and include sgd, got {', '.join(self.methods)}")
        if self.workers is not None and self.workers < 1:
            raise FlatnessError(f"--workers must be a positive integer, got {self.workers}")
        if self.samples < 1:
            raise FlatnessError(f"--samples must be a positive integer, got {self.samples}")
        if self.surface not in ("1d", "2d", "none"):
            raise FlatnessError(f"unknown --surface {self.surface!r}; expected 1d, 2d or none")
        if not 0 <= self.first_seed <= 2**31 - self.seeds:
            raise FlatnessError(
                f"--seed {self.first_seed} with --seeds {self.seeds} runs seeds up to {self.first_seed + self.seeds - 1}, "
                f"past the largest seed {2**31 - 1}: pass --seed at most {2**31 - self.seeds}"
            )


@dataclass
class DemoResult:
    out: Path
    report: Any
    summary: str
    seconds: float


def available_cores() -> int:
    """CPU cores this process may run on (affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows have no affinity API
        return os.cpu_count() or 1


def plan_runs(spec: DemoSpec, runs_dir: Path) -> list[dict[str, Any]]:
    """One job per (method, seed): label, TrainConfig dict, run folder. All configs validated here."""
    from flatness.training import TrainConfig
    from flatness.training.methods import check_method

    jobs = []
    for label in spec.methods:
        method, hyper, mult, _ = DEMO_METHODS[label]
        for seed in range(spec.first_seed, spec.first_seed + spec.seeds):
            cfg = TrainConfig(model="cnn1d", data="mnist1d", method=method, seed=seed, epochs=spec.epochs * mult, **hyper)
            check_method(cfg)  # the config validated itself on construction
            jobs.append({"label": label, "seed": seed, "config": cfg.to_dict(), "run": str(runs_dir / f"{label}-s{seed}"),
                         "weight": mult * (2 if method != "sgd" else 1)})
    return sorted(jobs, key=lambda j: -j["weight"])  # longest first: better packing on few cores


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker: train one run, then measure its final checkpoint into the report cache."""
    from flatness.report.compare import CompareSettings, measure_checkpoint
    from flatness.training import TrainConfig, train

    t0 = time.perf_counter()
    result = train(TrainConfig.from_dict(job["config"]), job["run"], device=job["device"], quiet=True)
    trained = time.perf_counter() - t0
    settings = CompareSettings(**job["settings"])
    measure_checkpoint(result.final, job["report"], settings, surface=job["surface"], device=job["device"])
    return {"label": job["label"], "seed": job["seed"], "final": str(result.final), "train_s": trained,
            "total_s": time.perf_counter() - t0}


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _prepare_out(out: Path, force: bool) -> None:
    from flatness.report.compare import _check_writable

    if out.exists() and not out.is_dir():
        raise FlatnessError(f"--out {out} exists and is not a folder")
    _check_writable(out)  # before any training: a folder we cannot write would fail only after the runs
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FlatnessError(f"demo folder {out} already exists; pass --force to replace it")
        if not (out / "runs").is_dir():
            raise FlatnessError(f"--force: {out} was not made by flatness demo (no runs/); refusing to delete it")


def _execute(jobs: list[dict[str, Any]], workers: int, t0: float) -> list[dict[str, Any]]:
    import multiprocessing as mp

    done = []
    LOG.info("demo: %d runs on %d worker process(es), 1 torch thread each", len(jobs), workers)
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        for r in pool.imap_unordered(_run_job, jobs):
            done.append(r)
            LOG.info("run %s seed %d finished: trained in %.1f s, measured in %.1f s (%d/%d, %.0f s elapsed)",
                     r["label"], r["seed"], r["train_s"], r["total_s"] - r["train_s"], len(done), len(jobs),
                     time.perf_counter() - t0)
        pool.close()
        pool.join()
    return done


def run_demo(out: str | Path, spec: DemoSpec | None = None, *, device: str = "cpu", force: bool = False,
             quiet: bool = True) -> DemoResult:
    """Train every method of ``spec`` for every seed, measure, and write ``out/report``.

    Everything (settings, every run's config, the output folder) is checked
    before the first run starts; an existing demo folder is replaced only
    with ``force`` and only if the demo made it.

    Returns:
        The report and a printable summary (methods, cost, mean +- sd, conclusion).
    """
    from flatness.report import CompareSettings, compare

    spec = spec or DemoSpec()
    out = Path(out)
    t0 = time.perf_counter()
    _prepare_out(out, force)
    jobs = plan_runs(spec, out / "runs")
    # top-3 eigenvalues and a 30-product trace keep measuring below training cost; no density (a figure, no number)
    settings = CompareSettings(samples=spec.samples, surface=spec.surface, top_k=3, trace_matvecs=30, density=False,
                               seed=spec.first_seed, surfaces_for="first-per-group")
    settings.validate()
    workers = min(spec.workers or available_cores(), len(jobs))
    if out.exists():
        shutil.rmtree(out / "runs", ignore_errors=True)
        shutil.rmtree(out / "report", ignore_errors=True)
    for j in jobs:
        j.update(device=device, report=str(out / "report"), settings=dataclasses.asdict(settings),
                 surface=j["seed"] == spec.first_seed)
    done = sorted(_execute(jobs, workers, t0), key=lambda r: (spec.methods.index(r["label"]), r["seed"]))
    LOG.info("report: assembling (%.0f s elapsed)", time.perf_counter() - t0)
    with _torch_threads(1):  # one thread here too: on a loaded machine a second thread only adds contention
        report = compare([r["final"] for r in done], out / "report", settings, labels=[r["label"] for r in done],
                         device=device, force=True, quiet=quiet, notes=protocol_notes(spec))
    seconds = time.perf_counter() - t0
    LOG.info("demo: finished in %.1f s", seconds)
    return DemoResult(out, report, summary(report, spec, seconds, workers), seconds)


def protocol_notes(spec: DemoSpec) -> list[str]:
    """The protocol and the hyperparameters, with the reason for each, for the report."""
    notes = [f"Every method makes the same number of parameter updates ({spec.epochs} epochs' worth, same cosine "
             "schedule); the alternate m-(A)RWP scheme reads two data epochs per epoch of updates; sgd-2x gets twice "
             f"the updates (the two-pass methods' gradient budget). {spec.seeds} seeds per method, paired by seed."]
    notes += [f"{label}: {DEMO_METHODS[label][3]}" for label in spec.methods]
    return notes


def summary(report: Any, spec: DemoSpec, seconds: float, workers: int) -> str:
    """Printable summary: per method cost and mean +- sd, then the generated conclusion."""
    from flatness.report.stats import conclusion, group_stats

    stats = group_stats(report.entries)
    lines = [f"MNIST-1D, cnn1d, {spec.epochs} epochs of updates, seeds {spec.first_seed}..{spec.first_seed + spec.seeds - 1}, "
             f"{workers} worker(s), {seconds:.0f} s:"]
    for g, r in stats.items():
        acc, lam = r["test_acc"], r["lambda_max"]
        lines.append(f"  {g:7s} updates {r['updates'] or 0:6.0f}  grad evals {r['grad_evals'] or 0:6.0f}  "
                     f"test acc {acc['mean']:6.2f} +- {acc['sd'] or 0:.2f}%  lambda_max {lam['mean']:7.3f} +- {lam['sd'] or 0:.3f}")
    lines += ["conclusion (generated):", *(f"  {s}" for s in conclusion(stats))]
    lines.append(f"report: {report.report_html}")
    return "\n".join(lines)
