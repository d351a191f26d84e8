r"""Loss and accuracy of a model on fixed batches, for the analysis and report code.

The dataset loss is the batch-size-weighted mean of the per-batch mean losses,

.. math::

    L = \frac{1}{N} \sum_b n_b \, \ell_b, \qquad N = \sum_b n_b,

so it does not depend on how the samples are split into batches. Accuracy
(in %) exists only for the classic classification path: an ``(output,
target)`` loss with integer class targets; otherwise it is NaN.

Evaluation runs in eval mode (BatchNorm running statistics, no dropout) and
restores the model's mode afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flatness.losses import LossFn, ModelLoss, batch_loss, batch_size


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any]) -> tuple[float, float]:
    """Mean loss and accuracy (%) of ``model`` over ``batches`` in eval mode.

    Args:
        model: the network.
        loss_fn: ``loss_fn(output, target)`` or a :class:`flatness.losses.ModelLoss`.
        batches: the fixed batches (tuples ``(x, y)``, or anything a ModelLoss takes).

    Returns:
        ``(loss, accuracy)``; accuracy is NaN unless the loss is the classic
        form with integer class targets.

    Example:
        >>> from torch import nn
        >>> m = nn.Linear(3, 2)
        >>> b = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
        >>> loss, acc = evaluate(m, nn.functional.cross_entropy, b)
        >>> 0 <= acc <= 100
        True
    """
    if not batches:
        raise ValueError("Expected at least one batch, got none")
    was_training = model.training
    model.eval()
    classify = not isinstance(loss_fn, ModelLoss)
    loss_sum = 0.0
    correct = 0
    total = 0
    try:
        for batch in batches:
            n = batch_size(batch)
            if classify:
                x, y = batch[0], batch[1]
                out = model(x)
                loss_sum += float(loss_fn(out, y).double()) * n
                if y.dtype in (torch.int64, torch.int32) and out.dim() == y.dim() + 1:
                    correct += int((out.argmax(-1) == y).sum())
                else:
                    classify = False
            else:
                loss_sum += float(batch_loss(model, loss_fn, batch).double()) * n
            total += n
    finally:
        model.train(was_training)
    return loss_sum / total, (100.0 * correct / total if classify else float("nan"))
