r"""1-D and 2-D loss surfaces (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets").

:func:`loss_surface` evaluates

.. math::

    f(\alpha_i) = L(\theta + \alpha_i \delta) \quad\text{or}\quad
    f(\alpha_i, \beta_j) = L(\theta + \alpha_i \delta + \beta_j \eta)

(and the accuracy) on a grid, for any ``nn.Module`` and fixed batches, in
memory or into a resumable .h5 file (:mod:`flatness.landscape.storage`).
:func:`surface_from_checkpoint` is what ``flatness surface`` runs: it loads a
checkpoint and its data, builds the directions (random, PCA of a run's
trajectory, interpolation towards other checkpoints, or the Hessian's top
eigenvectors), projects the trajectory, and calls :func:`loss_surface`. What
to compute is one frozen :class:`~flatness.landscape.spec.SurfaceSpec`, where
it goes one :class:`~flatness.landscape.spec.SurfaceFile`.

The pipeline is a few named steps: :func:`prepare_directions` (or the file's
own when resuming), :func:`plan_surface` (decide resume / create, method,
chunk size, the missing cells; take the file's lock), and
:func:`evaluate_grid` (chunks of points, written as they finish). The grid's
points are split into fixed chunks (:func:`~flatness.landscape.grid.chunk_ranges`);
each chunk is evaluated on every batch and written as one unit. Under
``torchrun`` the pending chunks are sharded over the ranks, gathered after
each round and written by rank 0. Because the chunking only depends on the
grid and the chunk size (stored in the file), an interrupted run resumed with
``resume=True``, or a run over several processes, computes the same numbers
as one uninterrupted process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from flatness import distributed
from flatness.checkpoint import resolve_checkpoint_path
from flatness.errors import FlatnessError
from flatness.landscape.directions import Direction, flatten, interpolation_directions, model_weights, random_directions
from flatness.landscape.evaluate import Batches, LossFn, auto_chunk_size, evaluate_points, resolve_method, vmap_failure
from flatness.landscape.grid import chunk_ranges, grid_points
from flatness.landscape.pca import covering_axes, pca_directions, project_trajectory, run_checkpoints
from flatness.landscape.spec import AUTO_POINTS, RANDOM_KINDS, SurfaceFile, SurfaceSpec
from flatness.landscape.storage import (
    Surface,
    SurfaceLock,
    SurfaceWriter,
    check_resume,
    create_surface_file,
    missing_mask,
    read_surface,
    upgrade_to_xy,
)
from flatness.losses import ModelLoss, batch_size, loss_name
from flatness.progress import progress

if TYPE_CHECKING:
    from flatness.analysis import Sources

T = TypeVar("T")
Callback = Callable[[int, int], None]


class SurfaceFallbackWarning(UserWarning):
    """``method="auto"`` chose vmap but the model cannot be vmapped: the loop is used (the message says why)."""


def _on_main(fn: Callable[[], T], info: distributed.DistInfo) -> T:
    """Run ``fn`` on rank 0 and share its result (or its FlatnessError) with every rank."""
    result: Any = None
    error: str | None = None
    if info.is_main:
        try:
            result = fn()
        except FlatnessError as e:
            error = str(e)
    if info.active:
        box: list[Any] = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise FlatnessError(error)
    return result


def _broadcast_directions(chosen: list[list[Direction]], center: Sequence[Tensor], dim: int, info: distributed.DistInfo) -> list[Direction]:
    """Rank 0's directions (``chosen[0]``) on every rank."""
    directions = chosen[0] if chosen else [[torch.empty_like(w) for w in center] for _ in range(dim)]
    if info.active:
        for direction in directions:
            for t in direction:
                dist.broadcast(t, src=0)
    return directions


def degenerate_reason(directions: Sequence[Sequence[Tensor]]) -> str | None:
    """Why a set of directions spans less than its dimension (a zero or a parallel pair), or None."""
    flat = [flatten(d) for d in directions]
    names = ("x", "y")
    for k, v in enumerate(flat):
        if not bool(v.norm() > 0):
            return f"the {names[k]} direction is zero (e.g. --to names the centre checkpoint itself), so the surface would be flat"
    if len(flat) == 2:
        cos = float((flat[0] @ flat[1]).abs() / (flat[0].norm() * flat[1].norm()))
        if cos > 1 - 1e-6:
            return "the x and y directions are parallel (e.g. the same checkpoint twice in --to), so the plane is a line"
    return None


def prepare_directions(
    model: nn.Module, batches: Batches, spec: SurfaceSpec, loss_fn: LossFn, directions: Sequence[Sequence[Tensor]] | None
) -> tuple[list[Direction], dict[str, Any]]:
    """The spec's directions (given ones, random, or Hessian eigenvectors) on the model's devices, checked.

    Returns:
        ``(directions, extra_settings)``; the Hessian kind records its eigenvalues.

    Raises:
        FlatnessError: wrong number or shapes, a kind that needs the tensors
            handed in, or degenerate directions without ``allow_degenerate``.
    """
    center = model_weights(model)
    recorded: dict[str, Any] = {}
    if directions is not None:
        dirs = [[d.detach().to(device=w.device, dtype=w.dtype) for d, w in zip(direction, center)] for direction in directions]
        if len(dirs) != spec.dim:
            raise FlatnessError(f"a {spec.dim}-D surface needs {spec.dim} direction(s), got {len(dirs)}")
        for direction in directions:
            if len(direction) != len(center) or any(d.shape != w.shape for d, w in zip(direction, center)):
                raise FlatnessError("a direction does not match the model's parameters (count or shapes)")
    elif spec.directions in RANDOM_KINDS:
        dirs = random_directions(center, spec.dim, norm=spec.directions, ignore=str(spec.ignore), seed=spec.seed)
    elif spec.directions == "hessian":
        from flatness.landscape.hessian_directions import hessian_directions

        dirs, eigenvalues = hessian_directions(model, loss_fn, batches, spec.dim, normalize=spec.hessian_normalize, seed=spec.seed)
        recorded["hessian_eigenvalues"] = eigenvalues
    else:
        raise FlatnessError(f"--directions {spec.directions} needs the direction tensors (surface_from_checkpoint builds them)")
    reason = degenerate_reason(dirs)
    if reason is not None and not spec.allow_degenerate:
        raise FlatnessError(f"{reason}; pass --allow-degenerate to compute it anyway")
    return dirs, recorded


@dataclass
class Plan:
    """What :func:`evaluate_grid` does: rank 0's decisions, shared with every rank."""

    chunk_size: int
    method: str
    mask: np.ndarray
    values: dict[str, np.ndarray]
    extra: dict[str, np.ndarray]
    directions: list[list[np.ndarray]] | None = None
    fallback: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def _keys(split: str, test: bool) -> list[str]:
    return [f"{split}_loss", f"{split}_acc"] + (["test_loss", "test_acc"] if test else [])


def _resume_plan(output: SurfaceFile, spec: SurfaceSpec, settings: dict[str, Any], keys: list[str]) -> Plan:
    """Rank 0, resuming: the file's directions, chunk size, method and missing cells (settings must match)."""
    upgrade_to_xy(output.path)  # files of flatness < 0.2 ("ij") are rewritten in the current layout first
    attrs = check_resume(output.path, settings)
    stored = read_surface(output.path)
    if len(stored.directions) != spec.dim:
        raise FlatnessError(f"cannot resume {output.path}: it stores {len(stored.directions)} direction(s), expected {spec.dim}")
    return Plan(
        chunk_size=int(attrs["chunk_size"]),
        method=str(attrs["method"]),
        mask=missing_mask(output.path, keys),
        values={k: stored.values[k] for k in keys},
        extra=stored.extra,
        directions=stored.directions,
        settings=stored.settings,
    )


def _choose_method(model: nn.Module, batches: Batches, spec: SurfaceSpec, loss_fn: LossFn, dirs: list[Direction]) -> tuple[str, str | None]:
    """The evaluation method, and the reason when ``auto``'s vmap had to fall back to the loop."""
    center = model_weights(model)
    how = resolve_method(spec.method, center[0].device, loss_fn)
    if spec.method == "vmap" and isinstance(loss_fn, ModelLoss):
        raise FlatnessError("--eval-mode vmap cannot evaluate a model-level loss (module:callable); use --eval-mode loop or auto")
    if how != "vmap":
        return how, None
    reason = vmap_failure(model, batches, center, dirs, loss_fn=loss_fn)
    if reason is None:
        return how, None
    if spec.method == "vmap":
        raise FlatnessError(f"this model cannot be evaluated with torch.func.vmap ({reason}); use --eval-mode loop (or auto)")
    return "loop", reason


def plan_surface(
    model: nn.Module, batches: Batches, spec: SurfaceSpec, loss_fn: LossFn, dirs: list[Direction] | None, output: SurfaceFile | None,
    settings: dict[str, Any],
) -> tuple[Plan, SurfaceLock | None]:
    """Rank 0: resume or create the file (holding its lock), choose method and chunk size, list the missing cells."""
    keys = _keys(spec.split, spec.test)
    existing = output is not None and output.path.exists()
    lock = SurfaceLock(output.path) if (output is not None and existing) else None
    try:
        if existing and output is not None and output.resume:
            plan = _resume_plan(output, spec, settings, keys)
            lock.release()  # type: ignore[union-attr] - the upgrade may have replaced the file: lock the one now there
            lock = SurfaceLock(output.path)
            return plan, lock
        if dirs is None:
            raise FlatnessError("no directions given (they may be omitted only when resuming an existing file)")
        how, fallback = _choose_method(model, batches, spec, loss_fn, dirs)
        size = spec.chunk_size if spec.chunk_size is not None else auto_chunk_size(model, batches, how)
        shape = len(spec.xs) if spec.ys is None else (len(spec.ys), len(spec.xs))
        plan = Plan(size, how, np.ones(int(np.prod(shape)), dtype=bool), {k: np.full(shape, np.nan) for k in keys},
                    dict(output.extra) if output is not None else {}, fallback=fallback, settings=settings)
        if output is not None:
            create_surface_file(
                output.path, (spec.xs, spec.ys), keys=keys, directions=[[t.detach().cpu().numpy() for t in d] for d in dirs],
                settings=settings, extra=plan.extra,
                attrs={"chunk_size": int(size), "method": how, "directions": spec.directions, "hessian_normalize": spec.hessian_normalize},
            )
            if lock is not None:
                lock.release()
            lock = SurfaceLock(output.path)
        return plan, lock
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _settings(batches: Batches, spec: SurfaceSpec, loss_fn: LossFn, test_batches: Batches | None, output: SurfaceFile | None) -> dict[str, Any]:
    out = spec.settings()
    out.update(
        keys=_keys(spec.split, spec.test),
        samples=sum(batch_size(b) for b in batches),
        batch_sizes=[batch_size(b) for b in batches],
        test_samples=sum(batch_size(b) for b in test_batches) if test_batches is not None else None,
        loss=loss_name(loss_fn),
    )
    out.update(output.settings if output is not None else {})
    return out


def loss_surface(
    model: nn.Module,
    batches: Batches,
    spec: SurfaceSpec,
    *,
    directions: Sequence[Sequence[Tensor]] | None = None,
    loss_fn: LossFn = nn.functional.cross_entropy,
    test_batches: Batches | None = None,
    output: SurfaceFile | None = None,
    callback: Callback | None = None,
) -> Surface:
    r"""Loss and accuracy of ``model`` on a 1-D or 2-D grid of weights around its own.

    Args:
        model: any ``nn.Module``; its parameters are the centre. It is
            evaluated in eval mode; its parameters are written per point and
            restored bitwise before this returns.
        batches: fixed batches on the model's device (``(x, y)`` pairs, or
            anything a :class:`~flatness.losses.ModelLoss` takes); every grid
            point sees all of them.
        spec: grid, directions and evaluation (``spec.test`` needs ``test_batches``).
        directions: one or two directions (lists of tensors like
            ``model.parameters()``), e.g. from :func:`~flatness.landscape.pca.pca_directions`;
            default: built from ``spec.directions`` (random or hessian);
            ignored when resuming (the file's are used).
        loss_fn: mean-reduced ``loss_fn(logits, y)`` or a ModelLoss (accuracy NaN).
        test_batches: also evaluated as ``test_loss`` / ``test_acc`` when ``spec.test``.
        output: write the surface to this file, chunk by chunk (see :class:`SurfaceFile`).
        callback: ``callback(points_done, points_total)`` after each written chunk (rank 0).

    Returns:
        The :class:`~flatness.landscape.storage.Surface` (on every rank);
        2-D values have shape ``(ny, nx)``.

    Raises:
        FlatnessError: the output exists without resume / force, is being
            written by another process, a resume with other settings,
            degenerate directions, or a model vmap cannot batch with ``method="vmap"``.

    Warns:
        SurfaceFallbackWarning: ``method="auto"`` chose vmap (CUDA) and the model cannot be vmapped.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> data = [(torch.randn(32, 4), torch.randint(0, 3, (32,)))]
        >>> s = loss_surface(net, data, SurfaceSpec(x="-1:1:5", y="-1:1:3"))
        >>> s["train_loss"].shape
        (3, 5)
    """
    if spec.auto_grid:
        raise FlatnessError("loss_surface needs a grid (spec.x, spec.y); only surface_from_checkpoint chooses one for pca")
    if spec.test and test_batches is None:
        raise FlatnessError("spec.test asks for test values but no test_batches were given")
    info = distributed.info()
    center = model_weights(model)
    if not center:
        raise FlatnessError("the model has no parameters to move along")
    settings = _settings(batches, spec, loss_fn, test_batches if spec.test else None, output)
    resuming = output is not None and output.resume and output.path.exists()
    chosen: list[list[Direction]] = []
    locks: list[SurfaceLock | None] = []

    def setup() -> Plan:
        """Rank 0: directions, then the plan (and the file's lock, kept on rank 0)."""
        dirs = None
        if not resuming:
            dirs, recorded = prepare_directions(model, batches, spec, loss_fn, directions)
            settings.update(recorded)
        plan, lock = plan_surface(model, batches, spec, loss_fn, dirs, output, settings)
        locks.append(lock)
        chosen.append(dirs if dirs is not None else [[torch.as_tensor(a).to(w) for a, w in zip(d, center)] for d in plan.directions or []])
        plan.directions = None  # rank 0's tensors are broadcast below
        return plan

    plan = _on_main(setup, info)
    lock = locks[0] if locks else None
    if plan.fallback is not None and info.is_main:
        warnings.warn(f"this model cannot be evaluated with torch.func.vmap ({plan.fallback}); using the loop over points",
                      SurfaceFallbackWarning, stacklevel=2)
    dirs = _broadcast_directions(chosen, center, spec.dim, info)
    job = GridJob(model, batches, test_batches if spec.test else None, loss_fn, dirs)
    try:
        values = evaluate_grid(job, spec, plan, output, callback=callback)
    finally:
        if lock is not None:
            lock.release()
    return Surface(
        xcoordinates=spec.xs, ycoordinates=spec.ys, values=values, directions=[[t.detach().cpu().numpy() for t in d] for d in dirs],
        settings=plan.settings, extra=plan.extra, source="flatness", path=output.path if output is not None else None,
    )


@dataclass(frozen=True)
class GridJob:
    """What every grid point is evaluated with: the model, its batches, the loss and the directions."""

    model: nn.Module
    batches: Batches
    test_batches: Batches | None
    loss_fn: LossFn
    directions: list[Direction]


def evaluate_grid(job: GridJob, spec: SurfaceSpec, plan: Plan, output: SurfaceFile | None, *,
                  callback: Callback | None = None) -> dict[str, np.ndarray]:
    """Evaluate the plan's missing chunks (sharded over ranks), write each as it finishes; return the value arrays."""
    info = distributed.info()
    center = model_weights(job.model)
    keys = list(plan.values)
    points = grid_points(spec.xs, spec.ys)
    chunks = chunk_ranges(len(points), plan.chunk_size)
    pending = [c for c, r in enumerate(chunks) if plan.mask[r.start : r.stop].any()]
    mine = [pending[i] for i in distributed.shard_indices(len(pending), info.rank, info.world_size)]
    rounds = -(-len(pending) // info.world_size) if pending else 0
    total = sum(len(chunks[c]) for c in pending)
    writer = SurfaceWriter(output.path, keys) if (output is not None and info.is_main) else None
    done = 0
    try:
        for t in range(rounds):
            row = torch.full((plan.chunk_size, 1 + len(keys)), float("nan"), dtype=torch.float64, device=center[0].device)
            row[:, 0] = -1
            if t < len(mine):
                r = chunks[mine[t]]
                coords = torch.as_tensor(points[r.start : r.stop])
                parts = [evaluate_points(job.model, b, center, job.directions, coords, loss_fn=job.loss_fn, method=plan.method)
                         for b in (job.batches, job.test_batches) if b is not None]
                row[:, 0] = mine[t]
                row[: len(r), 1:] = torch.cat(parts, 1)
            gathered = [torch.empty_like(row) for _ in range(info.world_size)] if info.active else [row]
            if info.active:
                dist.all_gather(gathered, row)
            for g in gathered:
                done += _store(g.cpu().numpy(), chunks, keys, plan.values, writer)
            if callback is not None and info.is_main:
                callback(done, total)
    finally:
        if writer is not None:
            writer.close()
    return plan.values


def _store(g: np.ndarray, chunks: list[range], keys: list[str], values: dict[str, np.ndarray], writer: SurfaceWriter | None) -> int:
    """Put one gathered chunk row block into ``values`` (and the file); return its number of points."""
    c = int(g[0, 0])
    if c < 0:
        return 0
    r = chunks[c]
    idx = np.arange(r.start, r.stop)
    cols = {k: g[: len(r), 1 + n] for n, k in enumerate(keys)}
    for k in keys:
        values[k].reshape(-1)[idx] = cols[k]
    if writer is not None:
        writer.write(idx, cols)
    return len(r)


def _fingerprint(weights: Sequence[Tensor]) -> str:
    h = hashlib.sha256()
    for w in weights:
        h.update(w.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]




def surface_from_checkpoint(
    checkpoint: str | Path,
    output: SurfaceFile,
    spec: SurfaceSpec,
    *,
    sources: Sources | None = None,
    quiet: bool = False,
    callback: Callback | None = None,
) -> Surface:
    """Compute the loss surface around a checkpoint into ``output`` (what ``flatness surface`` runs).

    Args:
        checkpoint: a ``.pt`` checkpoint, or a run directory (its ``final.pt``).
        output: the .h5 file, and whether to resume / replace it.
        spec: grid, directions, data and evaluation. ``interp`` needs
            ``spec.to``; ``pca`` needs ``spec.run`` (or a run directory as
            ``checkpoint``); a ``run`` with a 2-D surface also stores the
            projected trajectory. ``pca`` without ``spec.x`` gets a grid that
            covers the projected trajectory and the centre with a 20 % margin
            (:func:`~flatness.landscape.pca.covering_axes`), recorded in the
            file like a given one.
        sources: the user's own model / data / loss (see :class:`flatness.analysis.Sources`).
        quiet: no progress bar.
        callback: ``callback(points_done, points_total)`` after each chunk.

    Raises:
        FlatnessError: any user error (missing files, wrong combination of settings...),
            before anything is written.

    Example:
        >>> spec = SurfaceSpec(x="-1:1:21", y="-1:1:21")           # doctest: +SKIP
        >>> surface_from_checkpoint("runs/sgd", SurfaceFile("s.h5"), spec)  # doctest: +SKIP
    """
    from flatness.device import resolve_device

    ckpt_path, run_from_ckpt = resolve_checkpoint_path(checkpoint)
    run_dir = Path(spec.run) if spec.run is not None else (run_from_ckpt if spec.directions == "pca" else None)
    if spec.directions == "pca" and run_dir is None:
        raise FlatnessError("--directions pca needs --run RUN_DIR (the run whose checkpoints form the trajectory)")
    for target in spec.to:
        if not Path(target).is_file():
            raise FlatnessError(f"checkpoint {target} does not exist")
    dev = distributed.local_device(resolve_device(spec.device))
    joined = not (dist.is_available() and dist.is_initialized())
    info = distributed.init_from_env(dev)
    joined = joined and info.active
    bar = _ProgressCallback(quiet or not info.is_main, callback)
    try:
        return _surface_from_checkpoint(ckpt_path, run_dir, dev, output, spec, sources, callback=bar)
    finally:
        bar.close()
        if joined:  # we joined the group: leave it together, so no rank exits under a peer still talking
            dist.barrier()
            dist.destroy_process_group()


@dataclass
class _Loaded:
    """A loaded centre: the analysis (model, batches, loss), its test batches and recorded settings."""

    analysis: Any
    test_batches: Batches | None
    settings: dict[str, Any]


def _load_centre(ckpt_path: Path, run_dir: Path | None, dev: torch.device, spec: SurfaceSpec, sources: Sources | None) -> _Loaded:
    from flatness.analysis import Sources, prepare_analysis
    from flatness.data import analysis_batches

    analysis = prepare_analysis(ckpt_path, split=spec.split, samples=spec.samples, batch_size=spec.batch_size, device=dev,
                                sources=sources or Sources())
    test_batches = None
    if spec.test and spec.split != "test":
        ds = analysis.data
        test_batches = analysis_batches(ds.test, samples=min(analysis.samples, len(ds.test)), batch_size=spec.batch_size, device=dev)
    settings: dict[str, Any] = {
        "checkpoint": str(ckpt_path.resolve()),
        "weights": _fingerprint(model_weights(analysis.model)),
        "model": analysis.checkpoint.model_name,
        "dataset": analysis.dataset,
        "loss": analysis.loss,  # --loss (or the checkpoint's): a resume with another loss is refused
        "split": spec.split,
        "provenance": analysis.provenance,
    }
    if spec.to:
        settings["to"] = [str(Path(p).resolve()) for p in spec.to]
    if run_dir is not None:
        settings["run"] = str(run_dir.resolve())
    return _Loaded(analysis, test_batches, settings)


class _ProgressCallback:
    """A progress bar on stderr (unless ``quiet``) fed by :func:`loss_surface`'s callback, then ``inner``."""

    def __init__(self, quiet: bool, inner: Callback | None) -> None:
        self.quiet, self.inner, self.bar, self.done = quiet, inner, None, 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = progress(total=total, quiet=self.quiet, desc="surface", unit="pt")
        self.bar.update(done - self.done)
        self.done = done
        if self.inner is not None:
            self.inner(done, total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _surface_from_checkpoint(
    ckpt_path: Path, run_dir: Path | None, dev: torch.device, output: SurfaceFile, spec: SurfaceSpec, sources: Sources | None,
    *, callback: Callback | None,
) -> Surface:
    loaded = _load_centre(ckpt_path, run_dir, dev, spec, sources)
    net = loaded.analysis.model
    resuming = output.resume and output.path.exists()
    if not resuming:
        _check_centre(ckpt_path, loaded)
    dirs: list[Direction] | None = None
    extra: dict[str, np.ndarray] = dict(output.extra)
    if not resuming and spec.directions == "interp":
        name = loaded.analysis.checkpoint.model_name
        targets = [model_weights(_load_like(Path(p), name, sources, dev)) for p in spec.to]
        dirs = interpolation_directions(model_weights(net), targets, ignore=str(spec.ignore))
    coords = None
    if run_dir is not None and not resuming:
        dirs, trajectory_extra, coords = _trajectory(net, run_dir, spec, loaded.analysis.checkpoint.model_name, sources, dirs, dev)
        extra.update(trajectory_extra)
    if spec.auto_grid:
        spec = _covering_spec(spec, coords, output.path if resuming else None)
    out = SurfaceFile(output.path, resume=output.resume, force=output.force, settings={**loaded.settings, **output.settings}, extra=extra)
    needs_tensors = spec.directions in ("pca", "interp")
    return loss_surface(net, loaded.analysis.batches, spec, directions=dirs if needs_tensors else None,
                        loss_fn=loaded.analysis.loss_fn, test_batches=loaded.test_batches, output=out, callback=callback)


def _covering_spec(spec: SurfaceSpec, coords: np.ndarray | None, resumed: Path | None) -> SurfaceSpec:
    """``spec`` with the grid chosen for ``pca`` without ``x``/``y``: the resumed file's, or one covering ``coords``."""
    if resumed is not None:
        stored = read_surface(resumed).settings
        if not stored.get("x"):
            raise FlatnessError(f"cannot resume {resumed} without --x: the file records no grid")
        return dataclasses.replace(spec, x=stored["x"], y=stored.get("y"))
    if coords is None:
        raise FlatnessError("--directions pca without --x needs the run's trajectory (--run RUN_DIR) to choose the grid")
    axes = covering_axes(coords, AUTO_POINTS[int(spec.dim)])  # type: ignore[index]
    return dataclasses.replace(spec, x=axes[0], y=axes[1] if spec.dim == 2 else None)


def _check_centre(ckpt_path: Path, loaded: _Loaded) -> None:
    """The loss at the centre is finite (one pass over the surface's samples), as ``flatness hessian`` requires.

    Raises:
        FlatnessError: it is NaN or inf: every value around it would say nothing.
    """
    from flatness.evaluation import evaluate

    loss, _ = evaluate(loaded.analysis.model, loaded.analysis.loss_fn, loaded.analysis.batches)
    if not math.isfinite(loss):
        raise FlatnessError(
            f"{ckpt_path}: the loss at the centre is {loss}, so a surface around it is not defined; check the checkpoint and --loss"
        )


def _trajectory(
    net: nn.Module, run_dir: Path, spec: SurfaceSpec, name: str, sources: Sources | None, dirs: list[Direction] | None, dev: torch.device
) -> tuple[list[Direction] | None, dict[str, np.ndarray], np.ndarray | None]:
    """PCA directions of the run's checkpoints (for ``pca``), the trajectory's coordinates along the directions
    (stored in the file on a 2-D plane)."""
    extra: dict[str, np.ndarray] = {}
    paths = run_checkpoints(run_dir)
    trajectory = [[w.cpu() for w in model_weights(_load_like(p, name, sources, "cpu"))] for p in paths]
    epochs = [int(p.stem.split("_")[-1]) for p in paths]
    cpu_center = [w.cpu() for w in model_weights(net)]
    if spec.directions == "pca":
        res = pca_directions(cpu_center, trajectory, n_components=spec.dim, ignore=str(spec.ignore))
        dirs = [[d.to(dev) for d in direction] for direction in res.directions]
        extra.update(explained_variance_ratio_=res.explained_variance_ratio, explained_variance_=res.explained_variance,
                     singular_values_=res.singular_values)
    elif dirs is None and spec.directions in RANDOM_KINDS:
        dirs = random_directions(model_weights(net), spec.dim, norm=spec.directions, ignore=str(spec.ignore), seed=spec.seed)
    coords = None
    if dirs is not None and (spec.dim == 2 or spec.auto_grid):
        coords = project_trajectory(cpu_center, trajectory, [[d.cpu() for d in direction] for direction in dirs])
    if spec.dim == 2 and coords is not None:
        extra.update(proj_xcoord=coords[:, 0], proj_ycoord=coords[:, 1], proj_epochs=np.asarray(epochs, dtype=np.int64))
    return dirs, extra, coords


def _load_like(path: Path, name: str, sources: Sources | None, device: str | torch.device) -> nn.Module:
    """Load ``path`` and check it holds the same architecture as the centre."""
    from flatness.checkpoint import load_checkpoint

    model, kwargs = (sources.model, sources.model_kwargs) if sources is not None else (None, None)
    ckpt = load_checkpoint(path, model=model, model_kwargs=kwargs, device=device)
    if ckpt.model_name != name:
        raise FlatnessError(f"checkpoint {path} holds model {ckpt.model_name!r}, but the centre checkpoint holds {name!r}")
    return ckpt.model
