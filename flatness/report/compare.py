"""Compare checkpoints: losses, curvature, sharpness, interpolation, surfaces -> a report.

For each checkpoint ``compare`` computes (on the first ``samples`` training
samples, eval mode): train/test loss and accuracy; top-k Hessian eigenvalues
(Lanczos) and the trace (Hutch++); the random-perturbation sharpness curve
and adversarial rho-sharpness (:mod:`flatness.sharpness`); the loss along the
straight line from the first checkpoint to it; optionally 1D/2D
filter-normalized surfaces, the spectral density and (``per_layer``) the
top eigenvalue and trace of every diagonal Hessian block (one block per
parameter tensor, :func:`flatness.curvature.per_layer_curvature`). One Hessian
operator per checkpoint serves the eigenvalues, the trace, the density and
the blocks (one graph cache). Every artifact is cached by checkpoint content hash and settings
(:mod:`flatness.report.cache`), so adding one checkpoint to a comparison only
computes that one, and worker processes can fill the cache in parallel
(:func:`measure_checkpoint`) before one process writes the report.

Checkpoints are grouped by configuration (:mod:`flatness.report.groups`):
a group holds seeds of one configuration, labelled by its method (plus the
settings that tell configurations of one method apart); the report adds
per-group mean +- sd over seeds and paired differences against ``sgd`` and
``sgd-2x`` (:mod:`flatness.report.stats`). Every checkpoint's entry carries
its provenance block (checkpoint digest, run fingerprint, the samples used,
versions), and ``out`` is locked while the report is made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flatness.analysis import Analysis, Sources, prepare_analysis
from flatness.checkpoint import resolve_checkpoint_path
from flatness.errors import FlatnessError
from flatness.locks import LOCK_NAME, folder_lock
from flatness.provenance.digest import file_digest
from flatness.report.cache import ArtifactCache
from flatness.report.groups import form_groups
from flatness.version import __version__

SURFACE_KINDS = ("1d", "2d", "none")
# Bumped whenever a computation changes, so older cache entries are not reused.
CACHE_VERSION = "4"  # 4: per_layer in the core key
SURFACE_SCOPES = ("all", "first-per-group")


@dataclass
class CompareSettings:
    """What ``flatness compare`` computes; all of it is recorded in the report."""

    samples: int = 1000
    split: str = "train"  # train: the samples each run trained on; val: its --val-split hold-out; test
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
    surfaces_for: str = "all"  # "first-per-group": surfaces and interpolation only for each group's first checkpoint
    per_layer: bool | str = False  # each diagonal Hessian block's top eigenvalue and trace: True / "tensor" per parameter tensor, "module" per module

    def validate(self) -> None:
        if self.surface not in SURFACE_KINDS:
            raise FlatnessError(f"unknown --surface {self.surface!r}; expected one of {', '.join(SURFACE_KINDS)}")
        for name in ("samples", "batch_size", "top_k", "trace_matvecs", "draws", "surface_points", "interp_points"):
            if getattr(self, name) <= 0:
                raise FlatnessError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.surface != "none" and self.surface_points < 2:
            raise FlatnessError(f"--surface-points {self.surface_points} computes one corner of the grid only; ask for 2 or more")
        if not self.radii or any(not (math.isfinite(r) and r >= 0) for r in self.radii):
            raise FlatnessError(f"--radii must be finite numbers >= 0, got {list(self.radii)}")
        if not (math.isfinite(self.rho) and self.rho > 0):
            raise FlatnessError(f"--rho must be a finite positive number, got {self.rho}")
        if self.split not in ("train", "val", "test"):
            raise FlatnessError(f"unknown --split {self.split!r}; expected train, val or test")
        if self.per_layer not in (False, True, "tensor", "module"):
            raise FlatnessError(f"unknown --per-layer {self.per_layer!r}; expected tensor or module")
        if self.surfaces_for not in SURFACE_SCOPES:
            raise FlatnessError(f"unknown surfaces_for {self.surfaces_for!r}; expected one of {', '.join(SURFACE_SCOPES)}")

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
    notes: list[str] = field(default_factory=list)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)

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


def _read_jsonl(f: Path) -> list[dict[str, Any]] | None:
    try:
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return None


def _run_dir(path: Path) -> Path | None:
    """The run directory a checkpoint belongs to (``final.pt`` or ``checkpoints/*.pt``), if any."""
    for folder in (path.parent, path.parent.parent):
        if (folder / "config.json").is_file() or (folder / "metrics.jsonl").is_file():
            return folder
    return None


def _run_metrics(path: Path) -> list[dict[str, Any]] | None:
    """metrics.jsonl of the run the checkpoint belongs to, if any."""
    run = _run_dir(path)
    return _read_jsonl(run / "metrics.jsonl") if run and (run / "metrics.jsonl").is_file() else None


def _curvature_track(path: Path) -> list[dict[str, Any]] | None:
    """curvature.jsonl (``flatness train --track-curvature``) of the checkpoint's run, if any."""
    run = _run_dir(path)
    return _read_jsonl(run / "curvature.jsonl") if run and (run / "curvature.jsonl").is_file() else None


def run_cost(config: dict[str, Any], metrics: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Parameter updates, gradient evaluations and training wall time of a run.

    ``updates`` and ``grad_evals_per_update`` come from config.json when the
    trainer recorded them (``grad_evals = updates * grad_evals_per_update``);
    for older runs, from the last metrics row's step count (one optimizer
    call per batch; the alternate m-(A)RWP scheme updates on every second
    call and spends one gradient per call).
    """
    from flatness.training.config import TrainConfig
    from flatness.training.methods import grad_evals_per_batch

    cost: dict[str, Any] = {"updates": config.get("updates"), "grad_evals": config.get("grad_evals"), "train_seconds": None}
    if cost["updates"] is not None and cost["grad_evals"] is None and config.get("grad_evals_per_update") is not None:
        cost["grad_evals"] = int(cost["updates"]) * int(config["grad_evals_per_update"])
    if metrics:
        cost["train_seconds"] = sum(float(r.get("seconds", 0.0)) for r in metrics)
        calls = metrics[-1].get("step")
        if isinstance(calls, int) and config.get("method") and (cost["updates"] is None or cost["grad_evals"] is None):
            try:
                cfg = TrainConfig.from_dict(config)
                evals = grad_evals_per_batch(cfg)
            except FlatnessError:
                return cost
            alternate = cfg.method in ("m-rwp", "m-arwp") and cfg.mix_batches == "alternate"
            if cost["updates"] is None:
                cost["updates"] = calls // 2 if alternate else calls
            if cost["grad_evals"] is None:
                cost["grad_evals"] = calls * evals
    return cost


def _curvature(a: Analysis, s: CompareSettings) -> dict[str, Any]:
    """Top-k eigenvalues, Hutch++ trace and (optionally) the SLQ density and per-layer blocks from ONE Hessian operator."""
    from flatness.curvature import HessianOperator
    from flatness.curvature.measure import check_finite_point, finite_products

    H = HessianOperator(a.model, a.loss_fn, a.batches)
    try:
        check_finite_point(H)
        with finite_products(H):
            return _curvature_of(H, a, s)
    except FlatnessError as e:
        raise FlatnessError(f"{a.checkpoint.path}: {e}") from None


def _curvature_of(H: Any, a: Analysis, s: CompareSettings) -> dict[str, Any]:  # noqa: ANN401 - HessianOperator, imported lazily
    from flatness.curvature import hutchpp_trace, lanczos_top_eigs, per_layer_curvature, slq_density
    from flatness.curvature.lanczos import NonFiniteOperatorError

    eig = lanczos_top_eigs(H, s.top_k, s.tol, seed=s.seed)
    tr = hutchpp_trace(H, s.trace_matvecs, seed=s.seed)
    if not (math.isfinite(float(tr.trace)) and all(math.isfinite(float(v)) for v in eig.eigenvalues)):
        raise NonFiniteOperatorError(f"the estimates are not finite (trace {tr.trace})")
    out: dict[str, Any] = {
        "top_eigenvalues": [float(v) for v in eig.eigenvalues],
        "eigen_residuals": [float(v) for v in eig.residuals],
        "eigen_converged": bool(eig.converged),
        "trace": float(tr.trace),
        "trace_stderr": float(tr.stderr),
        "bn_mode": H.bn_mode,
    }
    if s.density:
        d = slq_density(H, 60, 2, num_points=400, seed=s.seed)
        out["density"] = {"grid": d.grid.tolist(), "values": d.density.tolist(), "sigma": d.sigma, "hvp_count": d.hvp_count}
    if s.per_layer:  # blocks per parameter tensor (or module), on the same operator (its graph cache)
        by = "tensor" if s.per_layer is True else s.per_layer
        blocks = per_layer_curvature(a.model, a.loss_fn, [], by=by, tol=s.tol, trace_matvecs=s.trace_matvecs, seed=s.seed, operator=H)
        out["per_layer"] = [{k: v for k, v in b.to_dict().items() if k != "hvp_count"} for b in blocks]
    out["hvp_count"] = int(H.hvp_count)
    return out


def _core_metrics(a: Analysis, s: CompareSettings, test_batches: list) -> dict[str, Any]:
    from flatness.evaluation import evaluate
    from flatness.sharpness import adversarial_sharpness, random_sharpness

    train_loss, train_acc = evaluate(a.model, a.loss_fn, a.batches)
    test_loss, test_acc = evaluate(a.model, a.loss_fn, test_batches)
    curve = random_sharpness(a.model, a.loss_fn, a.batches, s.radii, draws=s.draws, seed=s.seed)
    adv = adversarial_sharpness(a.model, a.loss_fn, a.batches, rho=s.rho)
    return {
        "train_loss": train_loss,
        "train_acc": train_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        **_curvature(a, s),
        "sharpness": {"radii": curve.radii, "loss_increase": curve.loss_increase, "stderr": curve.stderr, "draws": curve.draws},
        "adversarial_sharpness": adv,
        "adversarial_rho": s.rho,
    }


@torch.no_grad()
def _interpolation(first: Analysis, other: Analysis, s: CompareSettings) -> dict[str, Any]:
    """Loss and accuracy along (1 - a) * w_first + a * w_other (BN running statistics blended too)."""
    from flatness.evaluation import evaluate

    # clones: state_dict() returns the live tensors, which load_state_dict overwrites
    sa = {k: v.clone() for k, v in first.model.state_dict().items()}
    sb = {k: v.clone() for k, v in other.model.state_dict().items()}
    alphas = torch.linspace(-0.25, 1.25, s.interp_points).tolist()
    probe = other.model
    losses, accs = [], []
    try:
        for alpha in alphas:
            blended = {k: (sa[k] * (1 - alpha) + sb[k] * alpha) if sa[k].is_floating_point() else sb[k] for k in sb}
            probe.load_state_dict(blended)
            loss, acc = evaluate(probe, first.loss_fn, first.batches)
            losses.append(loss)
            accs.append(acc)
    finally:
        probe.load_state_dict(sb)
    return {"alpha": alphas, "loss": losses, "acc": accs}


def _check_writable(out: Path) -> None:
    """Refuse an --out that cannot be written, before anything is computed (nothing is left behind)."""
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise FlatnessError(f"cannot create report folder {out}: {probe} is not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".flatness-probe-", dir=probe)
    except OSError as e:
        raise FlatnessError(f"cannot write the report into {out}: {e.strerror} ({probe}); choose another --out") from None
    os.close(fd)
    os.unlink(name)


def _check_distinct(paths: list[Path], digests: list[str]) -> None:
    """The same checkpoint (same bytes) twice is refused: it would be two rows of one model."""
    seen: dict[str, Path] = {}
    for p, d in zip(paths, digests):
        if d in seen:
            raise FlatnessError(f"{p} is the same checkpoint as {seen[d]} (identical bytes); pass each checkpoint once")
        seen[d] = p


def _check_inputs(paths: list[Path], analyses: list[Analysis]) -> None:
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


def _keys(s: CompareSettings) -> tuple[str, str]:
    sd = s.to_dict()
    core = {k: sd[k] for k in ("samples", "split", "top_k", "tol", "trace_matvecs", "radii", "draws", "rho", "seed", "density", "per_layer")}
    surf = {k: sd[k] for k in ("samples", "split", "surface", "surface_points", "surface_range", "seed")}
    return json.dumps(core, sort_keys=True), json.dumps(surf, sort_keys=True)


def _measured_on(a: Analysis) -> str:
    """Cache-key part for what a measure is taken on: ``--model``/``--data``/``--loss`` (and kwargs) change every number."""
    info = a.data.info if a.data is not None else {}
    on = {"model": a.checkpoint.model_name, "model_kwargs": a.checkpoint.model_kwargs, "data": a.dataset, "loss": a.loss}
    return json.dumps({**on, "data_kwargs": info.get("kwargs")}, sort_keys=True, default=str)


def _test_batches(a: Analysis, s: CompareSettings, device: torch.device | str) -> list:
    from flatness.data import analysis_batches

    test = a.data.test  # type: ignore[union-attr]  # prepare_analysis always sets .data
    return analysis_batches(test, batch_size=s.batch_size, device=device)


def measure_checkpoint(path: str | Path, out: str | Path, settings: CompareSettings, *, surface: bool = True,
                       device: torch.device | str = "cpu", sources: Sources | None = None) -> None:
    """Fill ``out/cache`` with one checkpoint's core measures (and surface), as :func:`compare` would.

    Lets worker processes measure checkpoints in parallel; the final
    :func:`compare` then reuses every entry. Writes only into the cache.
    """
    from flatness.report.surfaces import surface_for

    settings.validate()
    path = resolve_checkpoint_path(path)[0]
    a = prepare_analysis(path, split=settings.split, samples=settings.samples, batch_size=settings.batch_size, device=device, sources=sources)
    cache = ArtifactCache(Path(out) / "cache", version=CACHE_VERSION)
    digest = file_digest(path)
    core_key, surf_key = _keys(settings)
    cache.get_or_compute("core", (digest, core_key, _measured_on(a)), lambda: _core_metrics(a, settings, _test_batches(a, settings, device)))
    if surface and settings.surface != "none":
        cache.get_or_compute("surface", (digest, surf_key, _measured_on(a)), lambda: surface_for(a, settings, device))


def _entry(path: Path, digest: str, a: Analysis, group: str, label: str) -> dict[str, Any]:
    cfg = a.checkpoint.config
    metrics = _run_metrics(path)
    seed = cfg.get("seed")
    return {
        "path": str(path), "label": label, "group": group, "method": cfg.get("method"),
        "seed": seed if isinstance(seed, int) else 0, "config": cfg, "sha256": digest,
        "cost": run_cost(cfg, metrics), "training_curve": metrics, "curvature_track": _curvature_track(path),
        "provenance": a.provenance,
    }


def compare(
    checkpoints: list[str | Path],
    out: str | Path,
    settings: CompareSettings | None = None,
    *,
    labels: list[str] | None = None,
    device: torch.device | str = "cpu",
    force: bool = False,
    quiet: bool = True,
    notes: list[str] | None = None,
    sources: Sources | None = None,
) -> CompareResult:
    """Compute everything for each checkpoint and write ``report.{html,md,json}`` in ``out``.

    An existing report in ``out`` is replaced only with ``force``; the cache
    in ``out/cache`` is always reused. Everything is validated (settings,
    checkpoints, one dataset and architecture, distinct files, a writable
    ``out``) before anything is computed or written.

    Args:
        labels: group name per checkpoint (default: its method, plus the
            settings that tell configurations of one method apart); a group
            holds seeds of ONE configuration (:mod:`flatness.report.groups`).
        notes: protocol notes shown at the top of the report (e.g. by the demo).
        sources: the user's own model / data / loss for every checkpoint
            (see :class:`flatness.analysis.Sources`); a checkpoint may also
            be a run directory (its ``final.pt``, else ``checkpoints/last.pt``).

    Raises:
        FlatnessError: bad settings, unreadable or duplicate checkpoints,
            checkpoints on different datasets, labels that pool two
            configurations, an unwritable ``out``, ``out`` in use by another
            compare, or an existing report without ``force``.
    """
    from flatness.report.figures import make_figures
    from flatness.report.render import write_reports

    s = settings or CompareSettings()
    s.validate()
    if not checkpoints:
        raise FlatnessError("compare needs at least one checkpoint")
    if labels is not None and len(labels) != len(checkpoints):
        raise FlatnessError(f"{len(labels)} labels for {len(checkpoints)} checkpoints")
    out = _check_out(Path(out), force)
    t0 = time.perf_counter()
    paths = [resolve_checkpoint_path(p)[0] for p in checkpoints]
    analyses = [prepare_analysis(p, split=s.split, samples=s.samples, batch_size=s.batch_size, device=device, sources=sources) for p in paths]
    _check_inputs(paths, analyses)
    digests = [file_digest(p) for p in paths]
    _check_distinct(paths, digests)
    names, groups = form_groups(paths, [a.checkpoint for a in analyses], labels)
    created = [p for p in reversed([out, *out.parents]) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlatnessError(f"cannot create report folder {out}: {e.strerror}") from None
    try:
        with folder_lock(out, busy=f"report folder {out} is in use by another flatness compare (lock {out / LOCK_NAME}); wait for it to finish",
                         unwritable=f"cannot write the report into {out}: {{reason}}; choose another --out"):
            _check_out(out, force)  # again, under the lock: a report finished meanwhile is not overwritten
            cache = ArtifactCache(out / "cache", version=CACHE_VERSION)
            entries = _measure_all(paths, digests, analyses, names, cache, s, device, quiet)
            figures = make_figures(entries, s, out)
            result = CompareResult(out, entries, cache.computed, cache.reused, time.perf_counter() - t0, list(notes or []), groups)
            write_reports(result, s, figures, dataset=analyses[0].dataset, version=__version__)
    except BaseException:
        for folder in [out / "cache", *reversed(created)]:  # a failure leaves no new empty folders (cached results stay)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return result


def _check_out(out: Path, force: bool) -> Path:
    """The report folder: not a file, no report in it unless ``force``, writable."""
    if out.exists() and not out.is_dir():
        raise FlatnessError(f"--out {out} exists and is not a folder")
    if (out / "report.json").exists() and not force:
        raise FlatnessError(f"{out} already holds a report; pass --force to replace it (the cache is kept)")
    _check_writable(out)
    return out


def _measure_all(paths: list[Path], digests: list[str], analyses: list[Analysis], names: list[str], cache: ArtifactCache,
                 s: CompareSettings, device: torch.device | str, quiet: bool) -> list[dict[str, Any]]:
    """One report entry per checkpoint (cached measures; interpolation and surface per group's first when asked)."""
    from flatness.progress import progress
    from flatness.report.surfaces import surface_for

    first = analyses[0]
    test_batches = _test_batches(first, s, device)
    core_key, surf_key = _keys(s)
    interp_key = json.dumps({"samples": s.samples, "points": s.interp_points}, sort_keys=True)
    entries: list[dict[str, Any]] = []
    taken: set[str] = set()
    groups_seen: set[str] = set()
    for i, (path, digest, a) in enumerate(progress(list(zip(paths, digests, analyses)), quiet=quiet, desc="checkpoints")):
        group = names[i]
        seed = a.checkpoint.config.get("seed")
        label = _label(path, {"method": f"{group} s{seed}" if names.count(group) > 1 else group}, taken)
        entry = _entry(path, digest, a, group, label)
        entry.update(cache.get_or_compute("core", (digest, core_key, _measured_on(a)), lambda a=a: _core_metrics(a, s, test_batches)))
        figure_too = s.surfaces_for == "all" or group not in groups_seen
        if figure_too:
            entry["interpolation"] = cache.get_or_compute(
                "interp", (digests[0], digest, interp_key, _measured_on(a)), lambda a=a: _interpolation(first, a, s)
            )
        if s.surface != "none" and figure_too:
            entry["surface"] = cache.get_or_compute("surface", (digest, surf_key, _measured_on(a)), lambda a=a: surface_for(a, s, device))
        groups_seen.add(group)
        entries.append(entry)
    return entries
