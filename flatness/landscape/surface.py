r"""1-D and 2-D loss surfaces (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets").

:func:`loss_surface` evaluates

.. math::

    f(\alpha_i) = L(\theta + \alpha_i \delta) \quad\text{or}\quad
    f(\alpha_i, \beta_j) = L(\theta + \alpha_i \delta + \beta_j \eta)

(and the accuracy) on a grid, for any ``nn.Module`` and fixed batches, in
memory or into a resumable .h5 file (:mod:`flatness.landscape.storage`).
:func:`surface_from_checkpoint` is what ``flatness surface`` runs: it loads a
checkpoint and its data, builds the directions (random, PCA of a run's
trajectory, or interpolation towards other checkpoints), projects the
trajectory, and calls :func:`loss_surface`.

The grid's points are split into fixed chunks (:func:`~flatness.landscape.grid.chunk_ranges`);
each chunk is evaluated on every batch (the batches are loaded once and stay
on the device) and written as one unit. Under ``torchrun`` the pending chunks
are sharded over the ranks, gathered after each round and written by rank 0.
Because the chunking only depends on the grid and the chunk size (stored in
the file), an interrupted run resumed with ``resume=True``, or a run over
several processes, computes the same numbers as one uninterrupted process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from flatness import distributed
from flatness.errors import FlatnessError
from flatness.landscape.directions import Direction, interpolation_directions, model_weights, random_directions
from flatness.landscape.evaluate import (
    Batches,
    LossFn,
    auto_chunk_size,
    evaluate_points,
    resolve_method,
    vmap_works,
)
from flatness.landscape.grid import Axis, chunk_ranges, grid_points, parse_axis
from flatness.landscape.pca import pca_directions, project_trajectory, run_checkpoints
from flatness.landscape.storage import (
    Surface,
    SurfaceWriter,
    check_resume,
    create_surface_file,
    missing_mask,
    read_surface,
)
from flatness.progress import progress

RANDOM_KINDS = ("filter", "layer", "model")
DIRECTION_KINDS = (*RANDOM_KINDS, "pca", "interp")

T = TypeVar("T")
Callback = Callable[[int, int], None]


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


def loss_surface(
    model: nn.Module,
    batches: Batches,
    x: str | Axis | tuple[float, float, int],
    y: str | Axis | tuple[float, float, int] | None = None,
    *,
    directions: str | Sequence[Sequence[Tensor]] | None = "filter",
    ignore: str = "biasbn",
    seed: int = 0,
    loss_fn: LossFn = nn.functional.cross_entropy,
    split: str = "train",
    test_batches: Batches | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    settings: dict[str, Any] | None = None,
    extra: dict[str, np.ndarray] | None = None,
    chunk_size: int | None = None,
    method: str = "auto",
    quiet: bool = True,
    callback: Callback | None = None,
) -> Surface:
    r"""Loss and accuracy of ``model`` on a 1-D or 2-D grid of weights around its own.

    Args:
        model: any ``nn.Module`` (its parameters are the centre; it is
            evaluated in eval mode and never modified).
        batches: fixed ``(x, y)`` batches on the model's device; every grid
            point sees all of them.
        x: the first axis, ``"MIN:MAX:N"`` or ``(min, max, n)``.
        y: the second axis for a 2-D surface.
        directions: ``"filter"`` (default), ``"layer"`` or ``"model"`` for
            seeded random normalized directions (Li et al. 2018), or a list
            of one or two directions (lists of tensors like
            ``model.parameters()``), e.g. from :func:`~flatness.landscape.pca.pca_directions`.
            ``None`` is allowed only when resuming a file (its stored
            directions are used).
        ignore: ``"biasbn"`` or ``"none"`` for random directions.
        seed: seed of the random directions.
        loss_fn: mean-reduced loss ``loss_fn(logits, y)``.
        split: name of ``batches`` in the keys (``"train"`` -> ``train_loss``, ``train_acc``).
        test_batches: also evaluate these as ``test_loss`` / ``test_acc``.
        out: write the surface to this .h5 file, chunk by chunk.
        resume: continue ``out`` if it exists: only missing cells are
            computed, with the file's directions, chunk size and method; a
            file made with other settings is refused.
        force: replace an existing ``out``.
        settings: extra settings stored in (and checked against) the file.
        extra: extra arrays stored in the file (trajectory, PCA variances).
        chunk_size: points per chunk (default: see :func:`~flatness.landscape.evaluate.auto_chunk_size`).
        method: ``"auto"``, ``"vmap"`` or ``"loop"`` (see :mod:`flatness.landscape.evaluate`).
        quiet: no progress bar.
        callback: ``callback(points_done, points_total)`` after each written chunk (rank 0).

    Returns:
        The :class:`~flatness.landscape.storage.Surface` (on every rank).

    Raises:
        FlatnessError: bad grid, ``out`` exists without ``force`` / ``resume``,
            or a resume with other settings.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> data = [(torch.randn(32, 4), torch.randint(0, 3, (32,)))]
        >>> s = loss_surface(net, data, "-1:1:5", "-1:1:3")
        >>> s["train_loss"].shape
        (5, 3)
    """
    info = distributed.info()
    xa = parse_axis(x, "--x")
    ya = parse_axis(y, "--y") if y is not None else None
    dim = 1 if ya is None else 2
    xs = xa.coordinates
    ys = ya.coordinates if ya is not None else None
    points = grid_points(xs, ys)
    center = model_weights(model)
    if not center:
        raise FlatnessError("the model has no parameters to move along")
    device = center[0].device
    n_train = sum(int(b[1].shape[0]) for b in batches)
    keys = [f"{split}_loss", f"{split}_acc"]
    if test_batches is not None:
        keys += ["test_loss", "test_acc"]
    kind = directions if isinstance(directions, str) else "custom"
    if isinstance(directions, str) and directions not in RANDOM_KINDS:
        raise ValueError(f"Unknown directions {directions!r}; expected 'filter', 'layer', 'model' or a list of directions")
    full_settings: dict[str, Any] = {
        "dim": dim,
        "x": xa.spec,
        "y": ya.spec if ya is not None else None,
        "keys": keys,
        "samples": n_train,
        "batch_sizes": [int(b[1].shape[0]) for b in batches],
        "test_samples": sum(int(b[1].shape[0]) for b in test_batches) if test_batches is not None else None,
        "directions": kind,
        "loss": getattr(loss_fn, "__name__", type(loss_fn).__name__),
    }
    if kind in RANDOM_KINDS:
        full_settings.update(ignore=ignore, seed=int(seed))
    full_settings.update(settings or {})
    out_path = Path(out) if out is not None else None

    chosen: list[list[Direction]] = []

    def setup() -> dict[str, Any]:
        """Rank 0: decide resume / create, the directions, method and chunk size, the missing cells."""
        existing = out_path is not None and out_path.exists()
        if existing and out_path.is_dir():
            raise FlatnessError(f"output {out_path} is a folder, expected a .h5 file path")
        if existing and not resume and not force:
            raise FlatnessError(f"output {out_path} already exists; pass --resume to continue it or --force to overwrite it")
        if existing and resume:
            attrs = check_resume(out_path, full_settings)
            stored = read_surface(out_path)
            if len(stored.directions) != dim:
                raise FlatnessError(f"cannot resume {out_path}: it stores {len(stored.directions)} direction(s), expected {dim}")
            chosen.append([[torch.as_tensor(a).to(device=w.device, dtype=w.dtype) for a, w in zip(d, center)] for d in stored.directions])
            return {
                "chunk_size": int(attrs["chunk_size"]),
                "method": str(attrs["method"]),
                "mask": missing_mask(out_path, keys),
                "values": {k: stored.values[k] for k in keys},
                "extra": stored.extra,
                "create": False,
            }
        if directions is None:
            raise FlatnessError("no directions given (directions=None is only for resuming an existing file)")
        if isinstance(directions, str):
            dirs = random_directions(center, dim, norm=directions, ignore=ignore, seed=seed)
        else:
            dirs = [[d.detach().to(device=w.device, dtype=w.dtype) for d, w in zip(direction, center)] for direction in directions]
            if len(dirs) != dim:
                raise FlatnessError(f"a {dim}-D surface needs {dim} direction(s), got {len(dirs)}")
            for direction in dirs:
                if len(direction) != len(center) or any(d.shape != w.shape for d, w in zip(direction, center)):
                    raise FlatnessError("a direction does not match the model's parameters (count or shapes)")
        how = resolve_method(method, device)
        if how == "vmap" and not vmap_works(model, batches, center, dirs, loss_fn=loss_fn):
            if method == "vmap":
                raise FlatnessError("this model cannot be evaluated with torch.func.vmap; use --method loop (or auto)")
            how = "loop"
        size = chunk_size if chunk_size is not None else auto_chunk_size(model, batches, how)
        if size <= 0:
            raise FlatnessError(f"chunk size must be a positive integer, got {size}")
        chosen.append(dirs)
        return {
            "chunk_size": int(size),
            "method": how,
            "mask": np.ones(len(points), dtype=bool),
            "values": {k: np.full(len(xs) if ys is None else (len(xs), len(ys)), np.nan) for k in keys},
            "extra": dict(extra or {}),
            "create": out_path is not None,
        }

    plan = _on_main(setup, info)
    dirs = _broadcast_directions(chosen, center, dim, info)
    if plan["create"] and out_path is not None:
        _on_main(
            lambda: create_surface_file(
                out_path,
                xcoordinates=xs,
                ycoordinates=ys,
                keys=keys,
                directions=[[t.detach().cpu().numpy() for t in d] for d in dirs],
                settings=full_settings,
                chunk_size=plan["chunk_size"],
                method=plan["method"],
                extra=plan["extra"],
            ),
            info,
        )

    values: dict[str, np.ndarray] = plan["values"]
    chunks = chunk_ranges(len(points), plan["chunk_size"])
    mask = plan["mask"]
    pending = [c for c, r in enumerate(chunks) if mask[r.start : r.stop].any()]
    mine = [pending[i] for i in distributed.shard_indices(len(pending), info.rank, info.world_size)]
    rounds = -(-len(pending) // info.world_size) if pending else 0
    total = sum(len(chunks[c]) for c in pending)
    width = plan["chunk_size"]
    writer = SurfaceWriter(out_path, keys) if (out_path is not None and info.is_main) else None
    bar = progress(total=total, quiet=quiet or not info.is_main, desc="surface", unit="pt")
    done = 0
    try:
        for t in range(rounds):
            row = torch.full((width, 1 + len(keys)), float("nan"), dtype=torch.float64, device=device)
            row[:, 0] = -1
            if t < len(mine):
                c = mine[t]
                r = chunks[c]
                coords = torch.as_tensor(points[r.start : r.stop])
                res = evaluate_points(model, batches, center, dirs, coords, loss_fn=loss_fn, method=plan["method"])
                if test_batches is not None:
                    res = torch.cat([res, evaluate_points(model, test_batches, center, dirs, coords, loss_fn=loss_fn, method=plan["method"])], 1)
                row[:, 0] = c
                row[: len(r), 1:] = res
            if info.active:
                gathered = [torch.empty_like(row) for _ in range(info.world_size)]
                dist.all_gather(gathered, row)
            else:
                gathered = [row]
            for g in gathered:
                g = g.cpu().numpy()
                c = int(g[0, 0])
                if c < 0:
                    continue
                r = chunks[c]
                idx = np.arange(r.start, r.stop)
                cols = {k: g[: len(r), 1 + n] for n, k in enumerate(keys)}
                for k in keys:
                    values[k].reshape(-1)[idx] = cols[k]
                if writer is not None:
                    writer.write(idx, cols)
                done += len(r)
                bar.update(len(r))
            if callback is not None and info.is_main:
                callback(done, total)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return Surface(
        xcoordinates=xs,
        ycoordinates=ys,
        values=values,
        directions=[[t.detach().cpu().numpy() for t in d] for d in dirs],
        settings=full_settings,
        extra=plan["extra"],
        source="flatness",
        path=out_path,
    )


def _fingerprint(weights: Sequence[Tensor]) -> str:
    h = hashlib.sha256()
    for w in weights:
        h.update(w.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _resolve_checkpoint(path: Path) -> tuple[Path, Path | None]:
    """A run directory stands for its ``final.pt`` (or ``checkpoints/last.pt``) and is the run."""
    if path.is_dir():
        for candidate in (path / "final.pt", path / "checkpoints" / "last.pt"):
            if candidate.is_file():
                return candidate, path
        raise FlatnessError(f"run directory {path} has no final.pt or checkpoints/last.pt")
    return path, None


def surface_from_checkpoint(
    checkpoint: str | Path,
    *,
    out: str | Path,
    x: str | Axis | tuple[float, float, int],
    y: str | Axis | tuple[float, float, int] | None = None,
    dim: int | None = None,
    directions: str | None = None,
    ignore: str | None = None,
    to: Sequence[str | Path] = (),
    run: str | Path | None = None,
    samples: int | None = None,
    split: str = "train",
    test: bool = False,
    batch_size: int = 1000,
    model: str | None = None,
    data: str | None = None,
    data_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    chunk_size: int | None = None,
    method: str = "auto",
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
    callback: Callback | None = None,
) -> Surface:
    """Compute the loss surface around a checkpoint into ``out`` (what ``flatness surface`` runs).

    Args:
        checkpoint: a ``.pt`` checkpoint, or a run directory (its ``final.pt``).
        out: the .h5 file to write.
        x, y: grid axes ``"MIN:MAX:N"``; ``y`` is required for ``dim=2``.
        dim: 1 or 2 (default: 2 when ``y`` is given).
        directions: ``filter`` | ``layer`` | ``model`` (random, Li et al.
            2018), ``pca`` (of ``run``'s checkpoints) or ``interp`` (towards
            the checkpoints in ``to``). Default: ``interp`` when ``to`` is
            given, else ``filter``.
        ignore: ``biasbn`` | ``none``; default ``biasbn`` for random
            directions and ``none`` for ``pca`` / ``interp``.
        to: one (1-D) or two (2-D) target checkpoints for ``interp``.
        run: a run directory whose ``checkpoints/epoch_*.pt`` form the
            trajectory: needed for ``pca``; with any 2-D surface, the
            trajectory is projected onto the plane and stored.
        samples: first N samples of the split (default: all).
        split: ``train`` or ``test``.
        test: also evaluate the test split (``test_loss`` / ``test_acc``),
            on its first ``min(samples, len(test))`` samples.
        batch_size, model, data, data_dir, device: as for every analysis command.
        seed: seed of random directions.
        chunk_size, method: see :func:`loss_surface`.
        resume, force: continue or replace an existing ``out``.
        quiet: no progress bar.
        callback: ``callback(points_done, points_total)`` after each chunk.

    Raises:
        FlatnessError: any user error (bad grid, missing files, wrong combination of flags...).
    """
    from flatness.device import resolve_device

    if dim is None:
        dim = 2 if y is not None else 1
    if dim not in (1, 2):
        raise FlatnessError(f"--dim must be 1 or 2, got {dim}")
    xa = parse_axis(x, "--x")
    if dim == 2 and y is None:
        raise FlatnessError("--dim 2 needs --y MIN:MAX:N")
    if dim == 1 and y is not None:
        raise FlatnessError("--y is only used with --dim 2")
    ya = parse_axis(y, "--y") if y is not None else None
    to = [Path(p) for p in (to or ())]
    if directions is None:
        directions = "interp" if to else "filter"
    if directions not in DIRECTION_KINDS:
        raise FlatnessError(f"unknown --directions {directions!r}; expected one of {', '.join(DIRECTION_KINDS)}")
    if to and directions != "interp":
        raise FlatnessError(f"--to is only used with --directions interp, not {directions!r}")
    if directions == "interp" and len(to) != dim:
        need = "one checkpoint (--to CKPT2)" if dim == 1 else "two checkpoints (--to CKPT2 CKPT3)"
        raise FlatnessError(f"--directions interp with --dim {dim} needs {need}, got {len(to)}")
    if ignore is None:
        ignore = "biasbn" if directions in RANDOM_KINDS else "none"
    if ignore not in ("biasbn", "none"):
        raise FlatnessError(f"unknown --ignore {ignore!r}; expected 'biasbn' or 'none'")
    if split not in ("train", "test"):
        raise FlatnessError(f"unknown --split {split!r}; expected 'train' or 'test'")
    if samples is not None and samples <= 0:
        raise FlatnessError(f"--samples must be a positive integer, got {samples}")
    out = Path(out)
    if out.suffix.lower() not in (".h5", ".hdf5"):
        raise FlatnessError(f"--out must be a .h5 file, got {out}")
    ckpt_path, run_from_ckpt = _resolve_checkpoint(Path(checkpoint))
    run_dir = Path(run) if run is not None else (run_from_ckpt if directions == "pca" else None)
    if directions == "pca" and run_dir is None:
        raise FlatnessError("--directions pca needs --run RUN_DIR (the run whose checkpoints form the trajectory)")
    for target in to:
        if not target.is_file():
            raise FlatnessError(f"checkpoint {target} does not exist")

    dev = distributed.local_device(resolve_device(device))
    joined = not (dist.is_available() and dist.is_initialized())
    info = distributed.init_from_env(dev)
    joined = joined and info.active
    surface = _surface_from_checkpoint(
        ckpt_path, dev, out=out, xa=xa, ya=ya, dim=dim, directions=directions, ignore=ignore, to=to, run_dir=run_dir,
        samples=samples, split=split, test=test, batch_size=batch_size, model=model, data=data, data_dir=data_dir,
        seed=seed, chunk_size=chunk_size, method=method, resume=resume, force=force, quiet=quiet, callback=callback,
    )
    if joined:  # we joined the group: leave it together, so no rank exits under a peer still talking
        dist.barrier()
        dist.destroy_process_group()
    return surface


def _surface_from_checkpoint(
    ckpt_path: Path,
    dev: torch.device,
    *,
    out: Path,
    xa: Axis,
    ya: Axis | None,
    dim: int,
    directions: str,
    ignore: str,
    to: list[Path],
    run_dir: Path | None,
    samples: int | None,
    split: str,
    test: bool,
    batch_size: int,
    model: str | None,
    data: str | None,
    data_dir: str | Path | None,
    seed: int,
    chunk_size: int | None,
    method: str,
    resume: bool,
    force: bool,
    quiet: bool,
    callback: Callback | None,
) -> Surface:
    from flatness.analysis import prepare_analysis
    from flatness.checkpoint import load_checkpoint
    from flatness.data import analysis_batches, load_dataset

    analysis = prepare_analysis(
        ckpt_path, model=model, data=data, data_dir=data_dir, split=split, samples=samples, batch_size=batch_size, device=dev
    )
    net = analysis.model
    test_batches = None
    if test and split != "test":
        ds = load_dataset(analysis.dataset, data_dir if data_dir is not None else analysis.checkpoint.config.get("data_dir"), augment=False)
        test_batches = analysis_batches(ds.test, samples=min(analysis.samples, len(ds.test)), batch_size=batch_size, device=dev)
    center = model_weights(net)

    settings: dict[str, Any] = {
        "checkpoint": str(ckpt_path.resolve()),
        "weights": _fingerprint(center),
        "model": analysis.checkpoint.model_name,
        "dataset": analysis.dataset,
        "split": split,
        "directions": directions,
        "ignore": ignore,
    }
    if directions in RANDOM_KINDS:
        settings["seed"] = int(seed)
    if to:
        settings["to"] = [str(p.resolve()) for p in to]
    if run_dir is not None:
        settings["run"] = str(run_dir.resolve())

    resuming = bool(resume and out.exists())
    dirs: str | list[Direction] | None
    extra: dict[str, np.ndarray] = {}
    if resuming:
        dirs = None  # the file's own directions are used
    elif directions in RANDOM_KINDS:
        dirs = random_directions(center, dim, norm=directions, ignore=ignore, seed=seed)
    elif directions == "interp":
        targets = [model_weights(_load_like(p, analysis.checkpoint.model_name, model, dev, load_checkpoint)) for p in to]
        dirs = interpolation_directions(center, targets, ignore=ignore)
    else:
        dirs = None
    trajectory: list[list[Tensor]] = []
    epochs: list[int] = []
    if run_dir is not None and not resuming:
        paths = run_checkpoints(run_dir)
        for p in paths:
            trajectory.append([w.cpu() for w in model_weights(_load_like(p, analysis.checkpoint.model_name, model, "cpu", load_checkpoint))])
            epochs.append(int(p.stem.split("_")[-1]))
        cpu_center = [w.cpu() for w in center]
        if directions == "pca":
            res = pca_directions(cpu_center, trajectory, n_components=dim, ignore=ignore)
            dirs = [[d.to(dev) for d in direction] for direction in res.directions]
            extra.update(
                explained_variance_ratio_=res.explained_variance_ratio,
                explained_variance_=res.explained_variance,
                singular_values_=res.singular_values,
            )
        if dim == 2 and isinstance(dirs, list):
            coords = project_trajectory(cpu_center, trajectory, [[d.cpu() for d in direction] for direction in dirs])
            extra.update(proj_xcoord=coords[:, 0], proj_ycoord=coords[:, 1], proj_epochs=np.asarray(epochs, dtype=np.int64))

    return loss_surface(
        net,
        analysis.batches,
        xa,
        ya,
        directions=dirs,
        ignore=ignore,
        seed=seed,
        loss_fn=analysis.loss_fn,
        split=split,
        test_batches=test_batches,
        out=out,
        resume=resume,
        force=force,
        settings=settings,
        extra=extra,
        chunk_size=chunk_size,
        method=method,
        quiet=quiet,
        callback=callback,
    )


def _load_like(path: Path, name: str, model: str | None, device: str | torch.device, load: Callable[..., Any]) -> nn.Module:
    """Load ``path`` and check it holds the same architecture as the centre."""
    ckpt = load(path, model=model, device=device)
    if ckpt.model_name != name:
        raise FlatnessError(f"checkpoint {path} holds model {ckpt.model_name!r}, but the centre checkpoint holds {name!r}")
    return ckpt.model
