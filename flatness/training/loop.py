"""The training loop: one ``opt.step(closure)`` per batch, evaluation every data epoch.

Protocol (issue 13): ``config.epochs`` counts epochs' worth of parameter
updates; the alternate m-(A)RWP scheme (one update per two batches) reads
``2 * epochs`` data epochs for the same updates, as the official script
does. The LR scheduler (and the sigma schedule) step once per UPDATE, read
from the optimizer's ``last_step_updated`` flag, and ``step`` in metrics
and checkpoints counts updates.

Reproducibility: the data order of data epoch ``e`` is a permutation drawn
from a generator seeded with ``(seed, e)``, and the augmentation of batch
``b`` from one seeded with ``(seed, e, b)``; the model, optimizer (with its
noise generator), scheduler, global RNG state, position in the epoch,
running epoch sums and curvature-tracking state are all in the checkpoint.
So a run resumed from any checkpoint follows exactly the path of an
uninterrupted run: bitwise on the same machine, same thread count.

The pipeline of :func:`train` is a few named steps: ``_prepare`` (settings,
data, model; nothing written), ``_open_run`` (run directory and lock),
``_build_state`` (optimizer, schedules, resume), then per data epoch
``_train_epoch`` and ``_end_epoch``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatness import distributed
from flatness.checkpoint import CheckpointCorrupted, read_checkpoint_file, save_checkpoint
from flatness.data import Dataset, Split, load_dataset
from flatness.data.base import Batch, map_batch
from flatness.data.splits import seed_for as _seed_for
from flatness.data.splits import split_validation
from flatness.device import resolve_device
from flatness.distributed import DistInfo
from flatness.errors import FlatnessError
from flatness.hooks import is_callable_spec
from flatness.losses import LossFn, ModelLoss, batch_size, resolve_loss
from flatness.models import build_model
from flatness.models.registry import default_model_kwargs
from flatness.progress import progress
from flatness.training.config import TrainConfig
from flatness.training.methods import MethodSpec, check_method
from flatness.training.parallel import TrainParallel
from flatness.provenance.fingerprint import code_record, compare_fingerprints, data_record, versions
from flatness.training.rundir import RunDir, check_epochs_change, check_resume_config, open_run_dir
from flatness.training.schedule import make_scheduler
from flatness.training.tracking import CurvatureTracker

__all__ = ["MethodSpec", "TrainResult", "TrainingDiverged", "evaluate", "split_validation", "train"]


class TrainingDiverged(FlatnessError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a run produced; ``is_main``: this process is rank 0 (the one that reports)."""

    run_dir: Path
    final: Path
    metrics: list[dict[str, Any]]
    seconds: float
    is_main: bool = True


def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed_for(seed, epoch)))


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for i in range(0, y.shape[0], batch_size):
        out = model(x[i : i + batch_size])
        loss_sum += F.cross_entropy(out.float(), y[i : i + batch_size], reduction="sum").double()
        correct += (out.argmax(1) == y[i : i + batch_size]).sum()
    model.train(was_training)
    n = y.shape[0]
    return float(loss_sum) / n, 100.0 * float(correct) / n


def _evaluate(s: _Session, split: Split) -> tuple[float, float]:
    """Mean loss and accuracy (%) of a split in eval mode (accuracy NaN unless ``s.data.classify``)."""
    if s.data.loss_fn is F.cross_entropy and split.classic:
        return evaluate(s.model, split.x, split.y)
    from flatness.evaluation import evaluate as evaluate_batches

    return evaluate_batches(s.model, s.data.loss_fn, [split.take(slice(i, i + 1000)) for i in range(0, len(split), 1000)])


class _Closure:
    """Forward + backward on one batch; remembers the first gradient pass's loss and logits.

    For per-sample methods (delta-SAM) it returns the per-sample losses and
    leaves the backward to the optimizer. Passes run through ``par.module``
    (the DDP wrapper under torchrun), inside ``par.pass_context``.
    """

    def __init__(self, par: TrainParallel, batch: Batch, spec: MethodSpec, loss_fn: LossFn = F.cross_entropy) -> None:
        self.par, self.batch, self.spec, self.loss_fn = par, batch, spec, loss_fn
        self.calls = 0
        self.first_loss: Tensor | None = None
        self.first_logits: Tensor | None = None

    def __call__(self) -> Tensor:
        with self.par.pass_context(self.calls):
            self.calls += 1
            per_sample = self.spec.per_sample_loss
            if isinstance(self.loss_fn, ModelLoss):
                out, loss = None, self.loss_fn(self.par.module, self.batch)
            else:
                x, y = self.batch
                out = self.par.module(x)
                loss = F.cross_entropy(out, y, reduction="none") if per_sample else self.loss_fn(out, y)
            if self.first_loss is None and torch.is_grad_enabled():  # delta-SAM's probes run without grad
                self.first_loss = loss.detach().mean()
                self.first_logits = out.detach() if out is not None else None
            if not per_sample:
                loss.backward()
        return loss


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# What a checkpoint must hold for ``--resume`` (see :func:`_payload`).
RESUME_KEYS = ("state_dict", "optimizer", "scheduler", "rng", "epoch", "step", "batch_in_epoch", "epoch_sums", "metrics")


def _checked_model(config: TrainConfig, ds: Dataset, dev: torch.device, loss_fn: LossFn = F.cross_entropy) -> nn.Module:
    """Build the model and run one forward pass on two training samples (eval mode, no grad), then one with grad.

    Raises:
        FlatnessError: the model cannot be built with ``model_kwargs``, has no
            trainable parameters, does not take the data's inputs, has another
            number of outputs than the data has classes (fewer, for the user's
            own data: labels 0..2 may train a 5-output model), or the loss
            does not depend on its parameters.
    """
    from flatness.analysis import check_fit, check_has_parameters, check_trainable

    try:
        model = build_model(config.model, **config.model_kwargs).to(dev)
    except (RuntimeError, ValueError) as e:
        raise FlatnessError(f"model {config.model!r} cannot be built with {config.model_kwargs}: {str(e).splitlines()[0]}") from None
    what = f"model {config.model!r}"
    check_has_parameters(model, what=what)
    model.eval()
    batch = map_batch(lambda t: t[:2].to(dev), ds.train.fields)
    if isinstance(loss_fn, ModelLoss) or not ds.train.classic or ds.num_classes is None or is_callable_spec(config.data):
        # the user's own data or loss: the generic check (classes counted from the labels are a lower bound)
        check_fit(model, loss_fn, batch, what=what, data=config.data, num_classes=ds.num_classes)
        check_trainable(model, loss_fn, batch, what=what)
        model.train()
        return model
    try:
        with torch.no_grad():
            out = model(ds.train.x[:2].to(dev))
    except RuntimeError as e:
        raise FlatnessError(
            f"model {config.model!r} does not take {config.data} inputs of shape {ds.input_shape}: {str(e).splitlines()[0]}"
        ) from None
    if out.ndim != 2 or out.shape[1] != ds.num_classes:
        raise FlatnessError(
            f"model {config.model!r} gives {out.shape[-1]} outputs, but {config.data} has {ds.num_classes} classes (check --model-kwargs)"
        )
    check_trainable(model, loss_fn, batch, what=what)  # eval mode: no BatchNorm statistics or dropout draws change
    model.train()
    return model


@dataclass
class _Data:
    """The run's tensors on the training device; ``train_idx`` excludes the validation split.

    Splits keep the structure of the data's samples: ``(x, y)`` pairs for the
    built-in datasets, whatever the user's data callable yields otherwise
    (then ``loss_fn`` is a :class:`~flatness.losses.ModelLoss`).
    """

    train: Split
    train_idx: Tensor
    val: Split | None
    test: Split
    augment: Callable[[Tensor, torch.Generator], Tensor] | None
    loss_fn: LossFn = F.cross_entropy

    @property
    def classify(self) -> bool:
        """Accuracy is defined: (x, y) data with class-index targets under an (output, target) loss."""
        return not isinstance(self.loss_fn, ModelLoss) and self.train.classic and not self.train.y.is_floating_point()

    @property
    def n(self) -> int:
        return int(self.train_idx.shape[0])


@dataclass
class _Session:
    """What every step of a run reads: settings, method, device, processes, data, run directory."""

    config: TrainConfig
    spec: MethodSpec
    dev: torch.device
    info: DistInfo
    model: nn.Module
    data: _Data
    quiet: bool = True
    on_epoch: Callable[[dict[str, Any]], None] | None = None
    run: RunDir = field(default_factory=lambda: RunDir(Path(".")))
    data_fingerprint: dict[str, Any] = field(default_factory=dict)
    replan_schedule: bool = False
    allow_changed: frozenset[str] = frozenset()
    replans: list[dict[str, int]] = field(default_factory=list)
    logger: Any = None  # log(metrics, step), e.g. flatness.loggers (rank 0 only)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.data.n / self.config.batch_size)


@dataclass
class _State:
    """What the loop advances and a checkpoint holds."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    par: TrainParallel
    tracker: CurvatureTracker | None
    sigma_schedule: Any = None
    epoch: int = 0  # data epochs done
    step: int = 0  # updates done
    batch_in_epoch: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    acc: Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))  # loss sum, correct, count
    bad_step: Tensor = field(default_factory=lambda: torch.full((), -1, dtype=torch.int64))
    seconds: float = 0.0  # training wall time so far (all sessions of the run)


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    device: str | torch.device = "auto",
    resume: bool = False,
    force: bool = False,
    quiet: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    replan_schedule: bool = False,
    allow_changed: frozenset[str] = frozenset(),
    logger: Any = None,
) -> TrainResult:
    """Train ``config.model`` on ``config.data`` with ``config.method``; write a run directory.

    Args:
        config: all settings (validated when it was built).
        out: the run directory (DESIGN.md section 6).
        device: ``auto``, ``cpu``, ``cuda``.
        resume: continue the run in ``out`` from ``checkpoints/last.pt``.
        force: replace an existing run directory (only once it is known to be writable).
        quiet: no progress bar.
        on_epoch: called with each data epoch's metrics dict.
        replan_schedule: on resume, accept another ``config.epochs`` than the
            run was planned for and replan the LR and sigma schedules over the
            new length from the current update (recorded in ``schedule_replans``).
        allow_changed: on resume, accept user code (``"code"``) or data
            (``"data"``) whose content differs from the run's fingerprint.
        logger: ``log(metrics, step)`` for each epoch row and curvature row
            (:mod:`flatness.loggers`).

    Raises:
        FlatnessError: bad settings, an existing ``out`` without
            ``resume``/``force``, a resume with different settings, fewer
            epochs than done or another plan without ``replan_schedule``,
            changed code or data, no checkpoint that verifies, a run in use
            by another process.
        TrainingDiverged: the loss became NaN/inf (names epoch and step).
    """
    spec = check_method(config)
    dev = distributed.local_device(resolve_device(device))
    with distributed.process_group(dev) as info:
        s = _prepare(config, spec, dev, info)
        s.quiet, s.on_epoch, s.logger = quiet, on_epoch, logger
        s.replan_schedule, s.allow_changed = replan_schedule, frozenset(allow_changed)
        with _open_run(out, resume=resume, force=force, info=info) as (run, resuming):
            s.run = run
            state = _build_state(s, resuming)
            try:
                t_start = time.perf_counter()
                for epoch in range(state.epoch, s.config.data_epochs):
                    _train_epoch(s, state, epoch)
                    _end_epoch(s, state, epoch)
                _save(s, state, run.final)
                return TrainResult(run.root, run.final, state.metrics, time.perf_counter() - t_start, info.is_main)
            finally:
                state.par.release()  # the DDP reducer goes while its process group is alive


def _prepare(config: TrainConfig, spec: MethodSpec, dev: torch.device, info: DistInfo) -> _Session:
    """Data, model and settings checks: everything that can fail before the run directory is touched."""
    TrainParallel.check(config, info)
    ds = load_dataset(config.data, config.data_dir, cutout=config.cutout, augment=config.augment, kwargs=config.data_kwargs or None)
    loss_fn = resolve_loss(config.loss)
    kwargs = {**default_model_kwargs(config.model, ds.num_classes, ds.input_shape), **config.model_kwargs}
    config = dataclasses.replace(config, model_kwargs=kwargs)
    torch.manual_seed(config.seed)
    model = _checked_model(config, ds, dev, loss_fn)
    train_idx, val_idx = split_validation(len(ds.train), config.val_split, config.seed)
    _check_tracking(config, len(ds.train), math.ceil(int(train_idx.shape[0]) / config.batch_size))
    train = ds.train.to(dev)
    val = Split.of(train.take(val_idx.to(dev))) if config.val_split else None
    data = _Data(train, train_idx.to(dev), val, ds.test.to(dev), ds.augment, loss_fn)
    return _Session(config, spec, dev, info, model, data, data_fingerprint=data_record(ds))


def _check_tracking(config: TrainConfig, n_train: int, batches_per_epoch: int) -> None:
    """``--track-curvature N`` must fall within the run, ``--track-samples`` within the training split.

    Raises:
        FlatnessError: N larger than the run's updates (nothing would be
            tracked), or more tracking samples than the split holds.
    """
    if not config.track_curvature:
        return
    updates = config.protocol(batches_per_epoch)["updates"]
    if config.track_curvature > updates:
        raise FlatnessError(
            f"--track-curvature {config.track_curvature} is more than the run's {updates} update{'s' if updates != 1 else ''}, so nothing would be "
            f"tracked; pass --track-curvature {updates} or less (or train longer)"
        )
    if config.track_samples > n_train:
        raise FlatnessError(f"--track-samples {config.track_samples} is more than the {n_train} training samples; pass {n_train} or less")


@contextlib.contextmanager
def _open_run(out: str | Path, *, resume: bool, force: bool, info: DistInfo) -> Iterator[tuple[RunDir, bool]]:
    """Rank 0 creates (and locks) the run directory; the other ranks wait for it."""
    if info.is_main:
        with open_run_dir(out, resume=resume, force=force) as (run, resuming):
            if info.active:
                torch.distributed.barrier()
            yield run, resuming
        return
    torch.distributed.barrier()
    run = RunDir(Path(out))
    yield run, resume and run.last.exists()


def _build_state(s: _Session, resuming: bool) -> _State:
    """Optimizer, schedules, tracker; the checkpoint's state on resume; config.json written."""
    c, run = s.config, s.run
    saved = run.read_config() if run.config.exists() else None
    if saved is not None:
        s.replans = list(saved.get("schedule_replans") or [])
        check_resume_config(saved, _config_record(s), run.root)
        compare_fingerprints(saved.get("fingerprint"), _fingerprint(s), allow=s.allow_changed, what=f"the run in {run.root}")
    optimizer = s.spec.build(s.model, c)
    scheduler = make_scheduler(optimizer, c, s.batches_per_epoch)
    tracker = None
    if c.tracking:  # a fixed batch of samples the run trains on (never held-out ones)
        fixed = s.data.train.take(s.data.train_idx[: c.track_samples])
        tracker = CurvatureTracker.from_config(c, fixed, s.data.loss_fn, c.epochs * s.batches_per_epoch, s.dev)
    state = _State(optimizer, scheduler, TrainParallel(s.model, s.info), tracker)
    state.acc, state.bad_step = state.acc.to(s.dev), state.bad_step.to(s.dev)
    if resuming:
        ckpt = _read_resume_checkpoint(s)
        replan = check_epochs_change(saved or {}, c.epochs, run.root, replan_schedule=s.replan_schedule)
        _restore(s, state, ckpt)
        if replan is not None:
            s.replans.append({**replan, "at_update": state.step})
    state.sigma_schedule = _sigma_schedule(c, optimizer, s.batches_per_epoch, state.step)
    state.par = TrainParallel.create(s.model, c, s.info, per_rank_first_pass=s.spec.per_rank_first_pass)
    if s.info.is_main:
        run.write_config(_config_record(s))
        if resuming:
            _write_rows(s, state)
    return state


def _config_record(s: _Session) -> dict[str, Any]:
    """``config.json``: every setting, the protocol's derived counts, the fingerprint and any schedule replans."""
    record = {**s.config.to_dict(), **s.config.protocol(s.batches_per_epoch), "fingerprint": _fingerprint(s)}
    if s.replans:
        record["schedule_replans"] = s.replans
    return record


def _fingerprint(s: _Session) -> dict[str, Any]:
    """What produced the run (:mod:`flatness.provenance.fingerprint`): the user's code files, the data, versions, device."""
    c = s.config
    specs = {"model": c.model, "data": c.data, "loss": c.loss}
    return {
        "code": {role: code_record(spec, s.run.root) for role, spec in specs.items()},
        "data": s.data_fingerprint,
        "versions": versions(),
        "device": s.dev.type,
    }


def _sigma_schedule(c: TrainConfig, optimizer: torch.optim.Optimizer, batches_per_epoch: int, step: int) -> Any:
    """CosineInc over the run's updates: ``--sigma-inc``, or the official ``--incstd``.

    ``--incstd`` (nblt/mARWP): sigma rises from ``weight_decay`` to ``sigma``,
    :math:`\\sigma_t = wd\\,(1 + (\\sigma/wd - 1)(1 - \\cos(\\pi t/T))/2)`.
    """
    if c.sigma_inc == 0.0 and not c.incstd:
        return None
    from flatness.optim import CosineInc

    inc = c.sigma_inc
    if c.incstd:
        for group in optimizer.param_groups:
            group.setdefault("initial_sigma", c.weight_decay)
        inc = c.sigma / c.weight_decay - 1.0
    return CosineInc(optimizer, c.epochs * batches_per_epoch, inc, last_step=step)


def _read_resume_checkpoint(s: _Session) -> dict[str, Any]:
    """``last.pt`` (else the newest checkpoint that verifies), checked against this run before anything is written."""
    c = s.config
    last, ckpt = _newest_verified(s)
    missing = [k for k in RESUME_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise FlatnessError(f"--resume: {last} is not a training checkpoint (it lacks {', '.join(missing)})")
    if isinstance(ckpt.get("config"), dict):
        check_resume_config(ckpt["config"], _config_record(s), s.run.root, what=f"those {last} was written with")
    if int(ckpt["step"]) > c.epochs * s.batches_per_epoch or int(ckpt["epoch"]) > c.data_epochs:
        done = (ckpt.get("config") or {}).get("epochs", "more")
        raise FlatnessError(
            f"--resume: the run in {s.run.root} has already trained {done} epochs ({int(ckpt['step'])} updates); "
            f"--epochs {c.epochs} is fewer: pass --epochs {done} or more, or start a new run with another --out"
        )
    return ckpt


def _newest_verified(s: _Session) -> tuple[Path, Any]:
    """``last.pt`` when it verifies; else the checkpoint of the run with the most updates that does (said on the log).

    Raises:
        FlatnessError: no checkpoint of the run verifies.
    """
    import logging

    try:
        return s.run.last, read_checkpoint_file(s.run.last, map_location=s.dev)
    except CheckpointCorrupted as e:
        damage = str(e)
    found: list[tuple[int, Path, Any]] = []
    for path in [s.run.final, *s.run.epoch_checkpoints()]:
        if not path.exists():
            continue
        try:
            ckpt = read_checkpoint_file(path, map_location=s.dev)
        except FlatnessError:
            continue
        if isinstance(ckpt, dict) and all(k in ckpt for k in RESUME_KEYS):
            found.append((int(ckpt["step"]), path, ckpt))
    if not found:
        raise FlatnessError(f"--resume: {damage}, and no other checkpoint of {s.run.root} verifies; start a new run")
    step, path, ckpt = max(found, key=lambda f: (f[0], f[1].name == "final.pt"))
    logging.getLogger("flatness").warning(f"{damage}; resuming from {path} (update {step}), the newest checkpoint that verifies")
    return path, ckpt


def _restore(s: _Session, state: _State, ckpt: dict[str, Any]) -> None:
    try:
        s.model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise FlatnessError(
            f"--resume: {s.run.last} holds another architecture than model {s.config.model!r} builds now "
            f"({state_dict_mismatch(e)}): its code changed since the run started; restore it, or start over with --force"
        ) from None
    try:
        state.optimizer.load_state_dict(ckpt["optimizer"])
        state.scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"], s.dev)
        state.epoch, state.step, state.batch_in_epoch = int(ckpt["epoch"]), int(ckpt["step"]), int(ckpt["batch_in_epoch"])
        state.metrics = list(ckpt["metrics"])
        state.acc = ckpt["epoch_sums"].to(s.dev)
        state.seconds = float(ckpt.get("train_seconds", 0.0))
        if state.tracker is not None and ckpt.get("curvature") is not None:
            state.tracker.load_state_dict(ckpt["curvature"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FlatnessError(f"--resume: {s.run.last} does not fit this run's {s.config.model} / {s.config.method}: {detail}") from None


def state_dict_mismatch(e: RuntimeError) -> str:
    """The first one or two problems of torch's multi-line ``load_state_dict`` error, shortened to one line.

    ``size mismatch for 0.weight: copying a param with shape torch.Size([4, 5]) from checkpoint, the shape in
    current model is torch.Size([6, 5]).`` becomes ``size mismatch for 0.weight: checkpoint [4, 5], model [6, 5]``.
    """
    lines = [ln.strip().rstrip(".") for ln in str(e).splitlines()[1:] if ln.strip()] or [str(e).strip()]
    short = [
        re.sub(r"copying a param with shape torch\.Size\((\[.*?\])\) from checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)",
               r"checkpoint \1, model \2", ln)
        for ln in lines[:2]
    ]
    return "; ".join(short) + (f"; {len(lines) - 2} more" if len(lines) > 2 else "")


def _payload(s: _Session, state: _State) -> dict[str, Any]:
    c = s.config
    return {
        "model": c.model,
        "model_kwargs": c.model_kwargs,
        "dataset": c.data,
        "method": c.method,
        "config": _config_record(s),
        "state_dict": s.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "rng": _rng_state(s.dev),
        "epoch": state.epoch,
        "step": state.step,
        "batch_in_epoch": state.batch_in_epoch,
        "epoch_sums": state.acc.detach().cpu().clone(),
        "metrics": state.metrics,
        "train_seconds": state.seconds,
        "curvature": state.tracker.state_dict() if state.tracker is not None else None,
        "fingerprint": _fingerprint(s),
    }


def _save(s: _Session, state: _State, path: Path) -> None:
    if not s.info.is_main:
        return
    try:
        save_checkpoint(path, _payload(s, state))
    except OSError as e:
        raise FlatnessError(f"cannot write checkpoint {path}: {e.strerror or e}; the previous checkpoint is kept") from None


def _write_rows(s: _Session, state: _State) -> None:
    s.run.write_metrics(state.metrics)
    if state.tracker is not None:
        s.run.write_jsonl(s.run.curvature, state.tracker.rows)


def _check_finite(s: _Session, state: _State, epoch: int, *, weights: bool = False) -> None:
    """Losses so far (and, before a mid-epoch checkpoint, the weights it would hold) are finite."""
    last_good = _last_good(s)
    if bool(state.bad_step >= 0):
        raise TrainingDiverged(
            f"training diverged: the loss became NaN or infinite at epoch {epoch + 1}, step {int(state.bad_step)}; "
            f"the last good checkpoint is {last_good}"
        )
    if weights and not bool(torch.stack([torch.isfinite(p).all() for p in s.model.parameters()]).all()):
        raise TrainingDiverged(
            f"training diverged: the weights became NaN or infinite at epoch {epoch + 1}, step {state.step}; "
            f"the last good checkpoint is {last_good}"
        )


def _last_good(s: _Session) -> str:
    """Where a diverged run can be picked up, or why there is nothing (the unfinished run is removed)."""
    if s.run.last.exists():
        return str(s.run.last)
    return f"none, so {s.run.root} is removed; lower --lr (or the method's radius / noise) and train again"


def _batch(s: _Session, order: Tensor, epoch: int, b: int, par: TrainParallel) -> Batch:
    bs = s.config.batch_size
    idx = par.local_indices(s.data.train_idx[order[b * bs : (b + 1) * bs]])
    batch = s.data.train.take(idx)
    if s.data.augment is not None:  # the built-in image sets: (x, y)
        x, y = batch
        batch = (s.data.augment(x, torch.Generator(device=s.dev).manual_seed(_seed_for(s.config.seed, epoch, b))), y)
    return batch


def _train_epoch(s: _Session, state: _State, epoch: int) -> None:
    """One pass over the training data from ``state.batch_in_epoch``: one ``opt.step`` per batch."""
    c, opt = s.config, state.optimizer
    t_epoch = time.perf_counter()
    order = _epoch_order(s.data.n, c.seed, epoch).to(s.dev)
    s.model.train()
    bar = progress(range(state.batch_in_epoch, s.batches_per_epoch), quiet=s.quiet, desc=f"epoch {epoch + 1}/{c.data_epochs}")
    with bar:  # Ctrl-C: "stopped after 1/2 steps"; another error: no line (the CLI says why)
        for b in bar:
            batch = _batch(s, order, epoch, b, state.par)
            closure = _Closure(state.par, batch, s.spec, s.data.loss_fn)
            opt.zero_grad(set_to_none=True)
            opt.step(closure)
            updated = getattr(opt, "last_step_updated", True)
            step_of_batch = state.step + 1  # the update this batch belongs to
            loss = closure.first_loss
            state.bad_step = torch.where((state.bad_step < 0) & ~torch.isfinite(loss), torch.full_like(state.bad_step, step_of_batch), state.bad_step)
            n = batch_size(batch)
            correct = (closure.first_logits.argmax(1) == batch[1]).sum().double() if s.data.classify else state.acc.new_zeros(())
            state.acc += torch.stack([loss.double() * n, correct, state.acc.new_tensor(n)])
            state.batch_in_epoch = b + 1
            if updated:
                _after_update(s, state, epoch)
    state.seconds += time.perf_counter() - t_epoch


def _after_update(s: _Session, state: _State, epoch: int) -> None:
    """Schedules, curvature tracking and the ``--save-every`` checkpoint after each update."""
    state.step += 1
    state.scheduler.step()
    if state.sigma_schedule is not None:
        state.sigma_schedule.step()
    if state.tracker is not None and s.info.is_main and state.tracker.after_update(state.step):
        _check_finite(s, state, epoch, weights=True)
        row = state.tracker.measure(s.model, state.step)
        s.model.train()
        if s.logger is not None:
            s.logger.log({f"curvature/{k}": v for k, v in row.items() if k != "step"}, state.step)
    every = s.config.save_every
    if every and state.step % every == 0 and state.batch_in_epoch < s.batches_per_epoch:
        _check_finite(s, state, epoch, weights=True)
        _save(s, state, s.run.last)


def _end_epoch(s: _Session, state: _State, epoch: int) -> None:
    """Evaluate, append the metrics row, checkpoint, call ``on_epoch``."""
    _check_finite(s, state, epoch)
    state.par.sync_buffers()
    sums = state.par.reduce_sums(state.acc)
    test_loss, test_acc = _evaluate(s, s.data.test)
    if not math.isfinite(test_loss):
        raise TrainingDiverged(
            f"training diverged: the test loss is {test_loss} after epoch {epoch + 1}, step {state.step}; "
            f"the last good checkpoint is {_last_good(s)}"
        )
    row = {
        "epoch": epoch + 1,
        "step": state.step,
        "lr": state.scheduler.get_last_lr()[0],
        "train_loss": float(sums[0] / sums[2]),
        "train_acc": float(100.0 * sums[1] / sums[2]),
        "test_loss": test_loss,
        "test_acc": test_acc,
        "seconds": state.seconds - sum(r["seconds"] for r in state.metrics),
    }
    if s.data.val is not None:
        row["val_loss"], row["val_acc"] = _evaluate(s, s.data.val)
    if not s.data.classify:  # accuracy exists only for (x, y) classification
        for key in ("train_acc", "test_acc", "val_acc"):
            row.pop(key, None)
    if state.tracker is not None:
        row["curvature_fraction"] = state.tracker.seconds / max(state.seconds, 1e-12)
        row["extra_fraction"] = state.tracker.extra_fraction  # (tracked - untracked) / untracked, one clock
    state.metrics.append(row)
    state.acc.zero_()
    state.epoch, state.batch_in_epoch = epoch + 1, 0
    if s.config.keep_epochs:
        _save(s, state, s.run.epoch(epoch + 1))
    _save(s, state, s.run.last)
    if s.info.is_main:
        _write_rows(s, state)
        if s.logger is not None:
            s.logger.log(row, state.step)
    if s.on_epoch is not None:
        s.on_epoch(row)
