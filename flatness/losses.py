r"""Losses the analysis and training code accept: ``(output, target)`` functions or a :class:`ModelLoss`.

Two forms, both returning the *mean* loss over one batch:

* the classic ``loss_fn(output, target)`` (``torch.nn.functional.cross_entropy``,
  MSE), applied to ``model(x)`` for a batch ``(x, y)``; accuracy is defined
  for the classification case;
* a :class:`ModelLoss` wrapping ``fn(model, batch)`` for everything else
  (language models, regression with extra inputs, contrastive losses): the
  batch is passed through untouched, so it may be a tuple, a list or a dict.

Averages over several batches weight each batch by :func:`batch_size`, so a
dataset loss is :math:`\frac{1}{N}\sum_b n_b \, \ell_b` whatever the batch
split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flatness.errors import FlatnessError
from flatness.hooks import is_callable_spec, is_user_fault, load_callable, user_code_error

OutputLoss = Callable[[Tensor, Tensor], Tensor]

LOSS_NAMES = ("cross_entropy", "mse")


@dataclass(frozen=True)
class ModelLoss:
    """A loss computed from the model and a whole batch: ``fn(model, batch) -> mean loss``.

    Attributes:
        fn: the user's callable; must return a scalar tensor, the mean over the batch.
        name: the spec it came from (recorded in checkpoints and outputs).
    """

    fn: Callable[[nn.Module, Any], Tensor]
    name: str

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        try:
            return self.fn(model, batch)
        except Exception as e:
            if not is_user_fault(e):
                raise
            raise user_code_error("loss", self.name, e) from e


LossFn = OutputLoss | ModelLoss


def mse_loss(output: Tensor, target: Tensor) -> Tensor:
    """Mean squared error; class-index targets are compared against their one-hot encoding."""
    if target.dtype in (torch.int64, torch.int32) and output.dim() == target.dim() + 1:
        target = nn.functional.one_hot(target, output.shape[-1]).to(output.dtype)
    return nn.functional.mse_loss(output, target.to(output.dtype))


def resolve_loss(spec: str | None) -> LossFn:
    """The loss named by ``spec``: ``cross_entropy`` (default), ``mse`` or a callable spec.

    A callable spec (``pkg.mod:fn`` / ``file.py:fn``) becomes a :class:`ModelLoss`
    whose function receives ``(model, batch)``.

    Raises:
        FlatnessError: unknown name or a callable that cannot be imported.
    """
    if spec is None or spec == "cross_entropy":
        return nn.functional.cross_entropy
    if spec == "mse":
        return mse_loss
    if is_callable_spec(spec):
        return ModelLoss(load_callable(spec), spec)
    raise FlatnessError(f"unknown loss {spec!r}; expected one of {', '.join(LOSS_NAMES)} or 'module:callable'")


def loss_name(loss_fn: LossFn) -> str:
    """The spec string that :func:`resolve_loss` maps back to ``loss_fn``."""
    if isinstance(loss_fn, ModelLoss):
        return loss_fn.name
    if loss_fn is mse_loss:
        return "mse"
    return "cross_entropy"


def batch_size(batch: Any) -> int:
    """Number of samples in ``batch``: the leading dimension of its first tensor.

    Raises:
        TypeError: a batch holding no tensor.
    """
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        items: Sequence[Any] = list(batch.values())
    elif isinstance(batch, Sequence) and not isinstance(batch, str):
        items = batch
    else:
        raise TypeError(f"cannot tell the size of a batch of type {type(batch).__name__}")
    for item in items:
        if isinstance(item, Tensor) and item.dim() > 0:
            return int(item.shape[0])
    raise TypeError("batch holds no tensor with a batch dimension")


def batch_loss(model: nn.Module, loss_fn: LossFn, batch: Any) -> Tensor:
    """Mean loss of ``model`` on one batch under either loss form."""
    if isinstance(loss_fn, ModelLoss):
        return loss_fn(model, batch)
    x, y = batch[0], batch[1]
    return loss_fn(model(x), y)
