"""Compare checkpoints: losses, curvature, sharpness, interpolation, surfaces -> a report.

For each checkpoint ``compare`` computes (on the first ``samples`` training
samples, eval mode): train/test loss and accuracy; top-k Hessian eigenvalues
(Lanczos) and the trace (Hutch++); the random-perturbation sharpness curve
and adversarial rho-sharpness (:mod:`flatness.sharpness`); the loss along the
straight line from the first checkpoint to it; optionally 1D/2D
filter-normalized surfaces and the spectral density. Every artifact is cached
by checkpoint content hash and settings (:mod:`flatness.report.cache`), so
adding one checkpoint to a comparison only computes that one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flatness.analysis import Analysis, prepare_analysis
from flatness.errors import FlatnessError
from flatness.report.cache import ArtifactCache, file_digest
from flatness.version import __version__

SURFACE_KINDS = ("1d", "2d", "none")
# Bumped whenever a computation changes, so older cache entries are not reused.
CACHE_VERSION = "2"


@dataclass
class CompareSettings:
    """What ``flatness compare`` computes; all of it is recorded in the report."""

    samples: int = 1000
    batch_size: int = 1000
    surface: str = "1d"
    surface_points: int = 21
    surface_range: float = 1.0
    top_k: int = 5
    tol: float = 1e-4
    trace_matvecs: int = 60
    density: bool = False
    radii: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
    draws: int = 5
    rho: float = 0.05
    interp_points: int = 25
    seed: int = 0

    def validate(self) -> None:
        if self.surface not in SURFACE_KINDS:
            raise FlatnessError(f"unknown --surface {self.surface!r}; expected one of {', '.join(SURFACE_KINDS)}")
        for name in ("samples", "batch_size", "top_k", "trace_matvecs", "draws", "surface_points", "interp_points"):
            if getattr(self, name) <= 0:
                raise FlatnessError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if any(r < 0 for r in self.radii):
            raise FlatnessError(f"--radii must be >= 0, got {list(self.radii)}")
        if self.rho <= 0:
            raise FlatnessError(f"--rho must be positive, got {self.rho}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["radii"] = list(self.radii)
        return d


@dataclass
class CompareResult:
    out: Path
    entries: list[dict[str, Any]]
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def report_html(self) -> Path:
        return self.out / "report.html"


def _label(path: Path, config: dict[str, Any], taken: set[str]) -> str:
    method = config.get("method") or "model"
    parent = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    base = method if method not in taken else f"{method} ({parent.name}/{path.stem})"
    n = 2
    label = base
    while label in taken:
        label = f"{base} #{n}"
        n += 1
    taken.add(label)
    return label


def _run_metrics(path: Path) -> list[dict[str, Any]] | None:
    """metrics.jsonl of the run the checkpoint belongs to, if any."""
    for folder in (path.parent, path.parent.parent):
        f = folder / "metrics.jsonl"
        if f.is_file():
            try:
                return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            except (OSError, json.JSONDecodeError):
                return None
    return None


def _core_metrics(a: Analysis, s: CompareSettings, test_batches: list) -> dict[str, Any]:
    from flatness.curvature import hessian_trace, top_eigenvalues
    from flatness.sharpness import adversarial_sharpness, random_sharpness
    from flatness.training.loop import evaluate

    x = torch.cat([b[0] for b in a.batches])
    y = torch.cat([b[1] for b in a.batches])
    train_loss, train_acc = evaluate(a.model, x, y, s.batch_size)
    tx = torch.cat([b[0] for b in test_batches])
    ty = torch.cat([b[1] for b in test_batches])
    test_loss, test_acc = evaluate(a.model, tx, ty, s.batch_size)
    eig = top_eigenvalues(a.model, a.loss_fn, a.batches, k=s.top_k, tol=s.tol, seed=s.seed)
    tr = hessian_trace(a.model, a.loss_fn, a.batches, num_matvecs=s.trace_matvecs, seed=s.seed)
    curve = random_sharpness(a.model, a.loss_fn, a.batches, s.radii, draws=s.draws, seed=s.seed)
    adv = adversarial_sharpness(a.model, a.loss_fn, a.batches, rho=s.rho)
    return {
        "train_loss": train_loss,
        "train_acc": train_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "top_eigenvalues": [float(v) for v in eig.eigenvalues],
        "eigen_residuals": [float(v) for v in eig.residuals],
        "eigen_converged": bool(eig.converged),
        "trace": float(tr.trace),
        "trace_stderr": float(tr.stderr),
        "hvp_count": int(eig.hvp_count) + int(tr.hvp_count),
        "sharpness": {"radii": curve.radii, "loss_increase": curve.loss_increase, "stderr": curve.stderr, "draws": curve.draws},
        "adversarial_sharpness": adv,
        "adversarial_rho": s.rho,
    }


def _density(a: Analysis, s: CompareSettings) -> dict[str, Any]:
    from flatness.curvature import spectral_density

    d = spectral_density(a.model, a.loss_fn, a.batches, num_steps=60, num_runs=2, num_points=400, seed=s.seed)
    return {"grid": d.grid.tolist(), "values": d.density.tolist(), "sigma": d.sigma, "hvp_count": d.hvp_count}


@torch.no_grad()
def _interpolation(first: Analysis, other: Analysis, s: CompareSettings) -> dict[str, Any]:
    """Loss and accuracy along (1 - a) * w_first + a * w_other (BN running statistics blended too)."""
    from flatness.training.loop import evaluate

    x = torch.cat([b[0] for b in first.batches])
    y = torch.cat([b[1] for b in first.batches])
    # clones: state_dict() returns the live tensors, which load_state_dict overwrites
    sa = {k: v.clone() for k, v in first.model.state_dict().items()}
    sb = {k: v.clone() for k, v in other.model.state_dict().items()}
    alphas = torch.linspace(-0.25, 1.25, s.interp_points).tolist()
    probe = other.model
    saved = sb
    losses, accs = [], []
    try:
        for alpha in alphas:
            blended = {k: (sa[k] * (1 - alpha) + sb[k] * alpha) if sa[k].is_floating_point() else sb[k] for k in sb}
            probe.load_state_dict(blended)
            loss, acc = evaluate(probe, x, y, s.batch_size)
            losses.append(loss)
            accs.append(acc)
    finally:
        probe.load_state_dict(saved)
    return {"alpha": alphas, "loss": losses, "acc": accs}


def compare(
    checkpoints: list[str | Path],
    out: str | Path,
    settings: CompareSettings | None = None,
    *,
    device: torch.device | str = "cpu",
    force: bool = False,
    quiet: bool = True,
) -> CompareResult:
    """Compute everything for each checkpoint and write ``report.{html,md,json}`` in ``out``.

    An existing report in ``out`` is replaced only with ``force``; the cache
    in ``out/cache`` is always reused.

    Raises:
        FlatnessError: bad settings, unreadable checkpoints, checkpoints on
            different datasets, or an existing report without ``force``.
    """
    from flatness.progress import progress
    from flatness.report.figures import make_figures
    from flatness.report.render import write_reports

    s = settings or CompareSettings()
    s.validate()
    if not checkpoints:
        raise FlatnessError("compare needs at least one checkpoint")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FlatnessError(f"--out {out} exists and is not a folder")
    if (out / "report.json").exists() and not force:
        raise FlatnessError(f"{out} already holds a report; pass --force to replace it (the cache is kept)")
    t0 = time.perf_counter()
    paths = [Path(p) for p in checkpoints]
    analyses = [prepare_analysis(p, samples=s.samples, batch_size=s.batch_size, device=device) for p in paths]
    datasets = {a.dataset for a in analyses}
    if len(datasets) > 1:
        raise FlatnessError(f"checkpoints were trained on different datasets ({', '.join(sorted(datasets))}); compare needs one")
    shapes = [{k: tuple(v.shape) for k, v in a.model.state_dict().items()} for a in analyses]
    other = next((i for i, s_ in enumerate(shapes) if s_ != shapes[0]), None)
    if other is not None:
        raise FlatnessError(
            f"{paths[other]} holds another network than {paths[0]} ({analyses[other].checkpoint.model_name} vs "
            f"{analyses[0].checkpoint.model_name}); compare interpolates between the checkpoints and needs one architecture"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlatnessError(f"cannot create report folder {out}: {e.strerror}") from None
    cache = ArtifactCache(out / "cache", version=CACHE_VERSION)
    digests = [file_digest(p) for p in paths]
    sd = s.to_dict()
    from flatness.data import analysis_batches, load_dataset

    first = analyses[0]
    ds = load_dataset(first.dataset, first.checkpoint.config.get("data_dir"), augment=False)
    test_batches = analysis_batches(ds.test, batch_size=s.batch_size, device=device)

    core_keys = {k: sd[k] for k in ("samples", "top_k", "tol", "trace_matvecs", "radii", "draws", "rho", "seed")}
    entries: list[dict[str, Any]] = []
    taken: set[str] = set()
    for path, digest, a in progress(list(zip(paths, digests, analyses)), quiet=quiet, desc="checkpoints"):
        core = cache.get_or_compute("core", (digest, json.dumps(core_keys, sort_keys=True)), lambda a=a: _core_metrics(a, s, test_batches))
        entry = {
            "path": str(path),
            "label": _label(path, a.checkpoint.config, taken),
            "method": a.checkpoint.config.get("method"),
            "config": a.checkpoint.config,
            "sha256": digest,
            **core,
        }
        if s.density:
            entry["density"] = cache.get_or_compute("density", (digest, str(s.samples), str(s.seed)), lambda a=a: _density(a, s))
        interp_keys = json.dumps({"samples": s.samples, "points": s.interp_points}, sort_keys=True)
        entry["interpolation"] = cache.get_or_compute("interp", (digests[0], digest, interp_keys), lambda a=a: _interpolation(first, a, s))
        if s.surface != "none":
            from flatness.report.surfaces import surface_for

            surf_keys = json.dumps({k: sd[k] for k in ("samples", "surface", "surface_points", "surface_range", "seed")}, sort_keys=True)
            entry["surface"] = cache.get_or_compute("surface", (digest, surf_keys), lambda a=a: surface_for(a, s, device))
        entry["training_curve"] = _run_metrics(path)
        entries.append(entry)

    figures = make_figures(entries, s, out)
    result = CompareResult(out, entries, cache.computed, cache.reused, time.perf_counter() - t0)
    write_reports(result, s, figures, dataset=first.dataset, version=__version__)
    return result

