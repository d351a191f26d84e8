"""The training loop: one ``opt.step(closure)`` per batch, evaluation every epoch.

Reproducibility: the data order of epoch ``e`` is a permutation drawn from a
generator seeded with ``(seed, e)``, and the augmentation of batch ``b`` from
one seeded with ``(seed, e, b)``; the model, optimizer (with its noise
generator), scheduler, global RNG state, position in the epoch and running
epoch sums are all in the checkpoint. So a run resumed from any checkpoint
follows exactly the path of an uninterrupted run: bitwise on the same
machine, same thread count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatness.checkpoint import read_checkpoint_file, save_checkpoint
from flatness.data import Dataset, load_dataset
from flatness.device import resolve_device
from flatness.errors import FlatnessError
from flatness.models import build_model
from flatness.models.registry import default_model_kwargs
from flatness.progress import progress
from flatness.training.config import TrainConfig
from flatness.training.methods import MethodSpec, check_method
from flatness.training.rundir import RunDir, check_resume_config, prepare_run_dir
from flatness.training.schedule import make_scheduler


class TrainingDiverged(FlatnessError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    final: Path
    metrics: list[dict[str, Any]]
    seconds: float


def _seed_for(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h * 1_000_003 + int(p) + 1) % (2**63 - 1)
    return h


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


class _Closure:
    """Forward + backward on one batch; remembers the first gradient pass's loss and logits.

    For per-sample methods (delta-SAM) it returns the per-sample losses and
    leaves the backward to the optimizer.
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, spec: MethodSpec, after_backward: Callable[[], None] | None) -> None:
        self.model, self.x, self.y, self.spec = model, x, y, spec
        self.after_backward = after_backward
        self.first_loss: Tensor | None = None
        self.first_logits: Tensor | None = None

    def __call__(self) -> Tensor:
        out = self.model(self.x)
        if self.spec.per_sample_loss:
            losses = F.cross_entropy(out, self.y, reduction="none")
            loss = losses
        else:
            loss = F.cross_entropy(out, self.y)
        if self.first_loss is None and torch.is_grad_enabled():  # delta-SAM's probes run without grad
            self.first_loss = loss.detach().mean()
            self.first_logits = out.detach()
        if not self.spec.per_sample_loss:
            loss.backward()
            if self.after_backward is not None:
                self.after_backward()
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


# What a checkpoint must hold for ``--resume`` (see ``payload`` in :func:`train`).
RESUME_KEYS = ("state_dict", "optimizer", "scheduler", "rng", "epoch", "step", "batch_in_epoch", "epoch_sums", "metrics")


def _checked_model(config: TrainConfig, ds: Dataset, dev: torch.device) -> nn.Module:
    """Build the model and run one forward pass on two training samples (eval mode, no grad).

    Raises:
        FlatnessError: the model cannot be built with ``model_kwargs``, does not take
            the data's inputs, or has another number of outputs than the data has classes.
    """
    try:
        model = build_model(config.model, **config.model_kwargs).to(dev)
    except (RuntimeError, ValueError) as e:
        raise FlatnessError(f"model {config.model!r} cannot be built with {config.model_kwargs}: {str(e).splitlines()[0]}") from None
    model.eval()
    try:
        with torch.no_grad():
            out = model(ds.train.x[:2].to(dev))
    except RuntimeError as e:
        raise FlatnessError(
            f"model {config.model!r} does not take {config.data} inputs of shape {ds.input_shape}: {str(e).splitlines()[0]}"
        ) from None
    model.train()
    if out.ndim != 2 or out.shape[1] != ds.num_classes:
        raise FlatnessError(
            f"model {config.model!r} gives {out.shape[-1]} outputs, but {config.data} has {ds.num_classes} classes (check --model-kwargs)"
        )
    return model


def _resolve_model_kwargs(config: TrainConfig, ds: Dataset) -> dict[str, Any]:
    return {**default_model_kwargs(config.model, ds.num_classes, ds.input_shape), **config.model_kwargs}


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    device: str | torch.device = "auto",
    resume: bool = False,
    force: bool = False,
    quiet: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``config.model`` on ``config.data`` with ``config.method``; write a run directory.

    Args:
        config: all settings (validated here).
        out: the run directory (DESIGN.md section 6).
        device: ``auto``, ``cpu``, ``cuda``.
        resume: continue the run in ``out`` from ``checkpoints/last.pt``.
        force: replace an existing run directory.
        quiet: no progress bar.
        on_epoch: called with each epoch's metrics dict.

    Raises:
        FlatnessError: bad settings, an existing ``out`` without
            ``resume``/``force``, a resume with different settings.
        TrainingDiverged: the loss became NaN/inf (names epoch and step).
    """
    from flatness import distributed

    config.validate()
    spec = check_method(config)
    dev = distributed.local_device(resolve_device(device))
    dist_info = distributed.init_from_env(dev)
    from flatness.training.parallel import TrainParallel

    TrainParallel.check(config, dist_info)
    ds = load_dataset(config.data, config.data_dir, cutout=config.cutout, augment=config.augment)
    config.model_kwargs = _resolve_model_kwargs(config, ds)
    torch.manual_seed(config.seed)
    model = _checked_model(config, ds, dev)  # before the run directory is touched: a bad model leaves nothing behind

    if dist_info.is_main:
        run, resuming = prepare_run_dir(out, resume=resume, force=force)
    else:
        run, resuming = RunDir(Path(out)), resume and (Path(out) / "checkpoints" / "last.pt").exists()
    if dist_info.active:
        torch.distributed.barrier()
    if resume and run.config.exists():
        check_resume_config(run.read_config(), config.to_dict(), run.root)

    par = TrainParallel.create(model, config, dist_info)
    optimizer = spec.build(model, config)
    train_x, train_y = ds.train.x.to(dev), ds.train.y.to(dev)
    test_x, test_y = ds.test.x.to(dev), ds.test.y.to(dev)
    n = train_y.shape[0]
    batches_per_epoch = math.ceil(n / config.batch_size)
    scheduler = make_scheduler(optimizer, config, batches_per_epoch)
    sigma_schedule = None

    start_epoch, step, batch_start = 0, 0, 0
    metrics: list[dict[str, Any]] = []
    acc = torch.zeros(3, dtype=torch.float64, device=dev)  # loss sum, correct, count of the epoch so far
    if resuming:
        # Everything is loaded and checked before the first write, so a last.pt that does not
        # belong to this run (or carries a pickle payload) changes nothing on disk.
        ckpt = read_checkpoint_file(run.last, map_location=dev)
        missing = [k for k in RESUME_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        if missing:
            raise FlatnessError(f"--resume: {run.last} is not a training checkpoint (it lacks {', '.join(missing)})")
        if isinstance(ckpt.get("config"), dict):
            check_resume_config(ckpt["config"], config.to_dict(), run.root, what=f"those {run.last} was written with")
        try:
            model.load_state_dict(ckpt["state_dict"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            _set_rng_state(ckpt["rng"], dev)
            start_epoch, step, batch_start = int(ckpt["epoch"]), int(ckpt["step"]), int(ckpt["batch_in_epoch"])
            metrics = list(ckpt["metrics"])
            acc = ckpt["epoch_sums"].to(dev)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FlatnessError(f"--resume: {run.last} does not fit this run's {config.model} / {config.method}: {detail}") from None
    if dist_info.is_main:
        run.write_config(config.to_dict())
        if resuming:
            run.write_metrics(metrics)

    def payload(epoch: int, batch_in_epoch: int) -> dict[str, Any]:
        return {
            "model": config.model,
            "model_kwargs": config.model_kwargs,
            "dataset": config.data,
            "method": config.method,
            "config": config.to_dict(),
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(dev),
            "epoch": epoch,
            "step": step,
            "batch_in_epoch": batch_in_epoch,
            "epoch_sums": acc.detach().cpu().clone(),
            "metrics": metrics,
        }

    def save(path: Path, epoch: int, batch_in_epoch: int) -> None:
        if dist_info.is_main:
            try:
                save_checkpoint(path, payload(epoch, batch_in_epoch))
            except OSError as e:
                raise FlatnessError(f"cannot write checkpoint {path}: {e.strerror or e}; the previous checkpoint is kept") from None

    def check_finite(epoch: int, *, weights: bool = False) -> None:
        """Losses so far (and, before a mid-epoch checkpoint, the weights it would hold) are finite."""
        last_good = run.last if run.last.exists() else "none"
        if bool(bad_step >= 0):
            raise TrainingDiverged(
                f"training diverged: the loss became NaN or infinite at epoch {epoch + 1}, step {int(bad_step)}; "
                f"the last good checkpoint is {last_good}"
            )
        if weights and not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
            raise TrainingDiverged(
                f"training diverged: the weights became NaN or infinite at epoch {epoch + 1}, step {step}; "
                f"the last good checkpoint is {last_good}"
            )

    if config.sigma_inc != 0.0:
        from flatness.optim import CosineInc

        sigma_schedule = CosineInc(optimizer, config.epochs * batches_per_epoch, config.sigma_inc, last_step=step)
    t_start = time.perf_counter()
    model.train()
    bad_step = torch.full((), -1, dtype=torch.int64, device=dev)
    for epoch in range(start_epoch, config.epochs):
        t_epoch = time.perf_counter()
        order = _epoch_order(n, config.seed, epoch).to(dev)
        bar = progress(range(batch_start, batches_per_epoch), quiet=quiet, desc=f"epoch {epoch + 1}/{config.epochs}")
        for b in bar:
            idx = par.local_indices(order[b * config.batch_size : (b + 1) * config.batch_size])
            x, y = train_x[idx], train_y[idx]
            if ds.augment is not None:
                g = torch.Generator(device=dev).manual_seed(_seed_for(config.seed, epoch, b))
                x = ds.augment(x, g)
            closure = _Closure(model, x, y, spec, par.after_backward)
            optimizer.zero_grad(set_to_none=True)
            optimizer.step(closure)
            scheduler.step()
            if sigma_schedule is not None:
                sigma_schedule.step()
            step += 1
            loss = closure.first_loss
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), torch.full_like(bad_step, step), bad_step)
            acc[0] += loss.double() * y.shape[0]
            acc[1] += (closure.first_logits.argmax(1) == y).sum()
            acc[2] += y.shape[0]
            if config.save_every and step % config.save_every == 0 and b + 1 < batches_per_epoch:
                check_finite(epoch, weights=True)
                save(run.last, epoch, b + 1)
        batch_start = 0
        check_finite(epoch)
        par.sync_buffers()
        sums = par.reduce_sums(acc)
        test_loss, test_acc = evaluate(model, test_x, test_y)
        if not math.isfinite(test_loss):
            raise TrainingDiverged(
                f"training diverged: the test loss is {test_loss} after epoch {epoch + 1}, step {step}; "
                f"the last good checkpoint is {run.last if run.last.exists() else 'none'}"
            )
        row = {
            "epoch": epoch + 1,
            "step": step,
            "lr": scheduler.get_last_lr()[0],
            "train_loss": float(sums[0] / sums[2]),
            "train_acc": float(100.0 * sums[1] / sums[2]),
            "test_loss": test_loss,
            "test_acc": test_acc,
            "seconds": time.perf_counter() - t_epoch,
        }
        metrics.append(row)
        acc.zero_()
        if config.keep_epochs:
            save(run.epoch(epoch + 1), epoch + 1, 0)
        save(run.last, epoch + 1, 0)
        if dist_info.is_main:
            run.write_metrics(metrics)
        if on_epoch is not None:
            on_epoch(row)
    save(run.final, config.epochs, 0)
    return TrainResult(run.root, run.final, metrics, time.perf_counter() - t_start)
