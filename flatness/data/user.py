"""The user's own data: ``--data package.module:fn`` or ``--data path/file.py:fn``.

``fn(**kwargs)`` returns ``(train, test)``, each one of

* a map-style ``torch.utils.data.Dataset`` (``__getitem__`` + ``__len__``),
* a ``torch.utils.data.DataLoader`` (its dataset is read in order, with its
  ``collate_fn``, unless its sampler is neither sequential nor random, in
  which case the loader is iterated as it is),
* an ``IterableDataset`` (of samples) or a list of samples,
* the split's tensors themselves: ``(x, y)`` (a tuple or list of tensors
  sharing their first dimension) or a dict of such tensors.

A sample or batch is a tensor, a tuple/list of tensors or a dict of tensors;
``(inputs, targets)`` pairs work with ``--loss cross_entropy`` / ``mse``,
any structure with ``--loss module:fn``. Both splits are read once, in order,
into memory as tensors (what the built-in datasets do too): every analysis
command then sees exactly the same samples, and the trainer shuffles them
itself with its own seeded generator. Random transforms inside a dataset are
therefore drawn once, when the data are read.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler

from flatness.data.base import Batch, Dataset, Split
from flatness.errors import FlatnessError
from flatness.hooks import call_with_kwargs, load_callable

READ_BATCH = 256  # samples per read when wrapping a map-style dataset


def load_user_dataset(spec: str, kwargs: dict[str, Any]) -> Dataset:
    """Call the user's data function and hold its two splits as tensors.

    Raises:
        FlatnessError: the callable cannot be imported, does not take
            ``kwargs``, does not return two datasets, or yields samples that
            are not tensors (or numbers) of one structure.
    """
    result = call_with_kwargs(load_callable(spec), spec, kwargs, "data callable")
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise FlatnessError(f"data callable {spec!r} must return (train, test) datasets or DataLoaders; it returned {_kind(result)}")
    train, test = (read_split(part, f"the {name} data of {spec!r}") for part, name in zip(result, ("train", "test")))
    if _structure(train.fields) != _structure(test.fields):
        raise FlatnessError(f"the train and test data of {spec!r} differ in structure: {_structure(train.fields)} vs {_structure(test.fields)}")
    return Dataset(spec, train, test, num_classes=infer_num_classes(train, test), info={"source": spec, "kwargs": dict(kwargs)})


def read_split(data: Any, what: str) -> Split:
    """Read a dataset, DataLoader or iterable of batches into one :class:`Split`, in order."""
    try:
        chunks = [_as_batch(b, what) for b in _batches(data, what)]
    except (TypeError, RuntimeError) as e:  # torch's collate on samples it cannot stack (PIL images, ragged tensors)
        raise FlatnessError(f"{what} cannot be read into tensors: {_first_line(e)}") from None
    if not chunks:
        raise FlatnessError(f"{what} is empty")
    first = _structure(chunks[0])
    for chunk in chunks[1:]:
        if _structure(chunk) != first:
            raise FlatnessError(f"{what} yields batches of different structure: {first} and {_structure(chunk)}")
    try:
        if isinstance(chunks[0], dict):
            return Split.of({k: torch.cat([c[k] for c in chunks]) for k in chunks[0]})  # type: ignore[index]
        if isinstance(chunks[0], Tensor):
            return Split.of(torch.cat(chunks))  # type: ignore[arg-type]
        return Split.of(tuple(torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]))))  # type: ignore[index]
    except (ValueError, RuntimeError) as e:
        raise FlatnessError(f"{what} cannot be held as tensors: {_first_line(e)}") from None


def _batches(data: Any, what: str) -> Iterable[Any]:
    """Batches of ``data`` in dataset order (a shuffling DataLoader is read through its dataset).

    A DataLoader yields batches; datasets and lists hold samples, collated by
    torch's default collate; a tuple/list of tensors (or a dict of tensors)
    is the split's own tensors, one batch.
    """
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset) or not isinstance(data.sampler, (SequentialSampler, RandomSampler)):
            return data
        return DataLoader(
            data.dataset, batch_size=data.batch_size or READ_BATCH, shuffle=False, collate_fn=data.collate_fn, num_workers=data.num_workers
        )
    if isinstance(data, IterableDataset):
        return DataLoader(data, batch_size=READ_BATCH)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (list, tuple, dict)):
        return DataLoader(data, batch_size=READ_BATCH, shuffle=False)
    if isinstance(data, dict) or (isinstance(data, (list, tuple)) and data and all(isinstance(t, Tensor) for t in data)):
        return [data]  # the split's own tensors: one batch
    if isinstance(data, (list, tuple)):
        return DataLoader(data, batch_size=READ_BATCH, shuffle=False)  # a list of samples, collated as torch does
    raise FlatnessError(f"{what} is {_kind(data)}; expected a torch Dataset, a DataLoader or a list of batches")


def _as_batch(batch: Any, what: str) -> Batch:
    """A batch as a tensor, a tuple of tensors or a dict of tensors (numbers become tensors)."""

    def tensor(v: Any) -> Tensor:
        if isinstance(v, Tensor):
            return v if v.dim() > 0 else v.reshape(1)
        try:
            return torch.as_tensor(v)
        except (TypeError, ValueError, RuntimeError):
            raise FlatnessError(f"{what} holds {_kind(v)}; samples must be tensors, numbers or arrays") from None

    if isinstance(batch, dict):
        return {str(k): tensor(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return tuple(tensor(v) for v in batch)
    return tensor(batch)


def _structure(batch: Batch) -> str:
    """A short description of a batch's structure without its batch size, e.g. ``(float32[40], int64[])``."""

    def one(t: Tensor) -> str:
        return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape[1:])}"

    if isinstance(batch, Tensor):
        return one(batch)
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k}: {one(v)}" for k, v in batch.items()) + "}"
    return "(" + ", ".join(one(t) for t in batch) + ")"


def infer_num_classes(train: Split, test: Split) -> int | None:
    """Classes of an ``(x, y)`` set with integer class labels (largest label + 1), else None."""
    if not (train.classic and test.classic):
        return None
    ys = (train.y, test.y)
    if any(y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or y.dim() != 1 for y in ys):
        return None
    if min(int(y.min()) for y in ys) < 0:
        return None
    return max(int(y.max()) for y in ys) + 1


def _kind(obj: Any) -> str:
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}" if not isinstance(obj, (int, float, str)) else repr(obj)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
