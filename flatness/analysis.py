"""What every analysis command starts from: a checkpoint, fixed batches and a loss.

``prepare_analysis`` loads the checkpoint (a ``.pt`` file or a run directory),
rebuilds its model (a registry name or the user's ``module:fn``, as recorded
in the checkpoint or given with ``--model``), finds its data (the checkpoint's
unless overridden; registry name or the user's ``module:fn``) and its loss
(the checkpoint's unless overridden; ``cross_entropy``, ``mse`` or the user's
``loss(model, batch)``), and returns the first ``samples`` of the chosen split
as device-resident batches, in dataset order and without augmentation.

Splits (issue 21): ``train`` is the samples the run TRAINED on (the training
split minus the ``--val-split`` hold-out, chosen by the run's seed exactly as
the trainer chose it), ``val`` the held-out ones, ``test`` the test split.
Before anything is measured the run's fingerprint is recomputed: user code
that changed, or data that now gives other samples, is refused unless
``Sources.allow_changed`` says so (:mod:`flatness.provenance.fingerprint`).
``Analysis.provenance`` is the block every output carries.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatness.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint_path, run_dir_of
from flatness.data import Dataset, Split, analysis_batches, load_dataset
from flatness.data.base import Batch, map_batch
from flatness.data.splits import SPLITS, split_validation
from flatness.errors import FlatnessError
from flatness.hooks import is_callable_spec
from flatness.losses import LossFn, ModelLoss, loss_name, resolve_loss
from flatness.provenance.digest import indices_digest
from flatness.provenance.fingerprint import code_record, compare_fingerprints, data_record, locate_spec, versions

# Exceptions a user's model, data or loss raises when they do not fit together
# (shape and dtype mismatches, missing keys); turned into one line naming the pieces.
MISFIT_ERRORS = (RuntimeError, TypeError, ValueError, IndexError, KeyError)


@dataclass
class Analysis:
    """A loaded checkpoint with the fixed batches and the loss every measure uses.

    Attributes:
        loss_fn: ``loss_fn(output, target)`` or a :class:`flatness.losses.ModelLoss`.
        dataset: the data spec (registry name or ``module:fn``).
        loss: the loss spec (``cross_entropy``, ``mse`` or ``module:fn``).
        run_dir: the run directory when the checkpoint was given as one.
        data: the whole dataset (both splits, as tensors), e.g. for test batches.
    """

    checkpoint: Checkpoint
    batches: list[Batch]
    loss_fn: LossFn
    dataset: str
    split: str
    samples: int
    loss: str = "cross_entropy"
    run_dir: Path | None = None
    data: Dataset | None = None
    provenance: dict[str, Any] | None = None

    @property
    def model(self) -> nn.Module:
        return self.checkpoint.model


@dataclass(frozen=True)
class Sources:
    """Where the model, data and loss come from when they are not the checkpoint's own.

    Every field None means "as recorded in the checkpoint". ``model`` and
    ``data`` are registry names or callable specs (``module:fn`` /
    ``file.py:fn``); ``loss`` is ``cross_entropy``, ``mse`` or a callable spec.
    ``data`` other than the data the checkpoint was trained on is refused
    unless ``allow_other_data`` (``--allow-other-data``): a Hessian or a
    surface on other data is legal but rarely what was meant. ``allow_changed``
    (``--allow-changed code|data``) accepts user code or data whose content
    differs from what the run was trained with.
    """

    model: str | None = None
    model_kwargs: dict[str, Any] | None = None
    data: str | None = None
    data_kwargs: dict[str, Any] | None = None
    data_dir: str | Path | None = None
    loss: str | None = None
    allow_other_data: bool = False
    allow_changed: frozenset[str] = frozenset()


def prepare_analysis(
    path: str | Path,
    *,
    split: str = "train",
    samples: int | None = None,
    batch_size: int = 1000,
    device: torch.device | str = "cpu",
    sources: Sources | None = None,
) -> Analysis:
    """Load ``path`` and the fixed analysis batches and loss for it.

    Args:
        path: a checkpoint file, or a run directory (its ``final.pt``, else
            ``checkpoints/last.pt``).
        split: ``train`` or ``test``.
        samples: the first N samples of the split (all when None).
        batch_size: samples per batch (memory only).
        device: where the model and batches live.
        sources: the model / data / loss when not the checkpoint's own
            (see :class:`Sources`); None: all as recorded.

    Raises:
        FlatnessError: bad checkpoint, unknown dataset or loss, user code that
            cannot be imported, or a model, data and loss that do not fit.

    Example:
        >>> a = prepare_analysis("runs/mine", samples=512,  # doctest: +SKIP
        ...                      sources=Sources(loss="mymod.py:lm_loss"))
        >>> a.model, a.batches, a.loss_fn  # doctest: +SKIP
    """
    src = sources or Sources()
    if split not in SPLITS:
        raise FlatnessError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    file, run_dir = resolve_checkpoint_path(path)
    ckpt = load_checkpoint(file, model=src.model, model_kwargs=src.model_kwargs, device=device)
    recorded = ckpt.raw.get("fingerprint") if isinstance(ckpt.raw.get("fingerprint"), dict) else None
    codes = (recorded or {}).get("code") or {}
    home = run_dir or run_dir_of(file)
    name = src.data or (locate_spec(ckpt.dataset, codes.get("data"), home) if ckpt.dataset else None)
    if name is None:
        raise FlatnessError(f"checkpoint {file} does not say which dataset it was trained on: pass --data")
    data_dir = src.data_dir if src.data_dir is not None else ckpt.config.get("data_dir")
    kwargs = src.data_kwargs if src.data_kwargs is not None else (ckpt.config.get("data_kwargs") if src.data is None else None)
    with _recorded(file, "data", name if src.data is None else None, "--data"):
        ds = load_dataset(name, data_dir, augment=False, kwargs=kwargs)  # its own errors first (missing files...)
    _check_same_data(file, ckpt.dataset, src)
    loss_spec = src.loss or (locate_spec(ckpt.loss, codes.get("loss"), home) if ckpt.loss else None)
    with _recorded(file, "loss", loss_spec if src.loss is None else None, "--loss"):
        loss_fn = resolve_loss(loss_spec)
    specs = {"model": ckpt.model_name, "data": name, "loss": loss_spec}
    current = {"code": {r: code_record(str(v), home) for r, v in specs.items() if v is not None}, "data": data_record(ds)}
    other_data = src.data is not None and src.data != ckpt.dataset and src.allow_other_data
    notes = compare_fingerprints(recorded, current, allow=src.allow_changed, what=f"checkpoint {file}", check_data=not other_data)
    indices = trained_on_indices(ckpt, ds, split, file)
    n = len(indices) if samples is None else samples
    if n > len(indices):
        raise FlatnessError(f"--samples {n} is more than the {len(indices)} samples of the {split} split ({_split_words(split)})")
    chosen = Split.of(ds.split("test" if split == "test" else "train").take(indices[:n]))
    batches = analysis_batches(chosen, batch_size=batch_size, device=device)
    what = f"model {ckpt.model_name!r} of {file}"
    check_has_parameters(ckpt.model, what=what)
    check_fit(ckpt.model, loss_fn, batches[0], what=what, data=name, num_classes=ds.num_classes)
    check_trainable(ckpt.model, loss_fn, batches[0], what=what)
    sample_block = {"split": split, "count": n, "of": len(indices), "selection": "first N in dataset order",
                    "indices_sha256": indices_digest(indices[:n]), "description": _split_words(split)}
    block = {"checkpoint": {"path": str(file), "sha256": ckpt.digest}, "run": recorded, "samples": sample_block,
             "versions": versions(), "device": str(torch.device(device).type), "accepted_changes": notes}
    return Analysis(ckpt, batches, loss_fn, name, split, n, loss_name(loss_fn), run_dir, ds, block)


def _split_words(split: str) -> str:
    return {"train": "samples the run trained on", "val": "samples held out by --val-split", "test": "the test split"}[split]


def trained_on_indices(ckpt: Checkpoint, ds: Dataset, split: str, file: Path) -> torch.Tensor:
    """Indices (into the dataset's train or test split) of the samples ``split`` names, in dataset order.

    ``train``: the training split minus the run's ``--val-split`` hold-out
    (chosen by the run's seed, as the trainer chose it); ``val``: the hold-out;
    ``test``: every test sample. Checkpoints without settings (other tools)
    count as trained on the whole training split.

    Raises:
        FlatnessError: ``val`` for a run without a validation split.
    """
    if split == "test":
        return torch.arange(len(ds.test))
    val_split = int(ckpt.config.get("val_split") or 0)
    seed = int(ckpt.config.get("seed") or 0)
    if split == "val" and val_split == 0:
        raise FlatnessError(f"checkpoint {file} was trained without --val-split, so there is no validation split; use --split train or test")
    train_idx, val_idx = split_validation(len(ds.train), val_split, seed) if val_split else (torch.arange(len(ds.train)), torch.arange(0))
    return val_idx if split == "val" else train_idx


@contextlib.contextmanager
def _recorded(file: Path, what: str, spec: str | None, flag: str) -> Iterator[None]:
    """User code recorded in a checkpoint that fails to load: say so, and how to point at where it is now."""
    try:
        yield
    except FlatnessError as e:
        if spec is None or not is_callable_spec(spec):
            raise
        raise FlatnessError(f"checkpoint {file} records {what} {spec!r}, which cannot be loaded ({e}); pass {flag} with where that code is now") from None


def _check_same_data(file: Path, recorded: str | None, src: Sources) -> None:
    """Refuse ``--data`` other than the checkpoint's own, unless allowed.

    The user's own data callable may have moved (another file or module):
    the same function name counts as the same data.
    """
    if src.data is None or recorded is None or src.allow_other_data or src.data == recorded:
        return
    if is_callable_spec(src.data) and is_callable_spec(recorded) and src.data.rpartition(":")[2] == recorded.rpartition(":")[2]:
        return
    raise FlatnessError(
        f"checkpoint {file} was trained on {recorded!r}, but --data is {src.data!r}; pass --allow-other-data to measure it on other data"
    )


def check_fit(model: nn.Module, loss_fn: LossFn, batch: Batch, *, what: str, data: str, num_classes: int | None = None) -> None:
    """One forward pass (no grad) on two samples of ``batch``: the model, data and loss must fit together.

    Used by the analysis commands and the trainer before any work or write.

    Args:
        model: the network (its mode is left as it is).
        loss_fn: ``loss_fn(output, target)`` or a :class:`flatness.losses.ModelLoss`.
        batch: a batch of the data, in its own structure.
        what: how the model is named in messages, e.g. ``"model 'cnn1d' of a.pt"``.
        data: the data spec, for messages.
        num_classes: classes of ``(x, y)`` classification data (checked
            against the output width for cross-entropy), None when unknown.

    Raises:
        FlatnessError: naming the model, the data and what did not fit.
    """
    small = _head(batch, 2)
    if isinstance(loss_fn, ModelLoss):
        try:
            with torch.no_grad():
                value = loss_fn.fn(model, small)  # the user's function itself: its own exception, named below
        except MISFIT_ERRORS as e:
            raise FlatnessError(f"loss {loss_fn.name!r} fails on {what} with {data} data: {_first_line(e)}") from None
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise FlatnessError(f"loss {loss_fn.name!r} must return a scalar tensor (the mean over the batch), got {_describe(value)}")
        return
    if not (isinstance(small, tuple) and len(small) == 2):
        raise FlatnessError(
            f"{data} yields batches of {_describe(small)}, not (inputs, targets) pairs: pass --loss module:fn taking (model, batch)"
        )
    try:
        with torch.no_grad():
            out = model(small[0])
            loss_fn(out, small[1])
    except MISFIT_ERRORS as e:
        raise FlatnessError(f"{what} does not fit {data} data and loss {loss_name(loss_fn)!r}: {_first_line(e)}") from None
    if num_classes is not None and loss_fn is nn.functional.cross_entropy and out.shape[-1] < num_classes:
        raise FlatnessError(f"{what} has {out.shape[-1]} outputs, but {data} has {num_classes} classes")


def check_has_parameters(model: nn.Module, *, what: str) -> None:
    """Some parameter of ``model`` requires grad (checked before any forward pass, so it is named first)."""
    params = list(model.parameters())
    if not params:
        raise FlatnessError(f"{what} has no parameters: nothing to train or measure (build the model with some nn.Parameter)")
    if not any(p.requires_grad for p in params):
        raise FlatnessError(f"{what} has all its parameters frozen (requires_grad=False): unfreeze the ones to train or measure")


def check_trainable(model: nn.Module, loss_fn: LossFn, batch: Batch, *, what: str) -> None:
    """The loss on two samples of ``batch`` must depend on some parameter of ``model`` (one pass with grad).

    Training needs a gradient and a curvature measure needs a Hessian; a model
    without parameters, with all of them frozen, or a loss that ignores the
    model (a constant tensor) gives neither.

    Raises:
        FlatnessError: naming which of the three it is and what to change.
    """
    check_has_parameters(model, what=what)
    small = _head(batch, 2)
    with torch.enable_grad():
        value = loss_fn(model, small) if isinstance(loss_fn, ModelLoss) else loss_fn(model(small[0]), small[1])
    if not (isinstance(value, torch.Tensor) and value.requires_grad):
        raise FlatnessError(
            f"loss {loss_name(loss_fn)!r} does not depend on the parameters of {what} (it returned a constant tensor, "
            "without a grad_fn): compute it from model(...) without .item(), .detach() or torch.no_grad()"
        )


def _head(batch: Batch, n: int) -> Batch:
    return map_batch(lambda t: t[:n], batch)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict):
        return f"dicts with keys {', '.join(map(str, obj))}"
    if isinstance(obj, tuple):
        return f"tuples of {len(obj)}"
    return type(obj).__name__
