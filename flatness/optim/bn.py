"""Keep BatchNorm running statistics out of perturbed forward passes.

A perturbed pass (SAM's second pass, the w + eps pass of m-(A)RWP, delta-SAM's
probing passes) evaluates the network at weights that are never kept, so the
running mean / variance it would record describe a network that does not exist.
:func:`disable_running_stats` switches recording off for the duration of the
pass: in training mode the batch statistics still normalise the activations,
but ``running_mean``, ``running_var`` and ``num_batches_tracked`` are left
bit-for-bit unchanged (unlike the ``momentum = 0`` trick of the reference code,
which still bumps ``num_batches_tracked`` and turns a NaN batch into NaN stats).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def disable_running_stats(model: nn.Module | None) -> Iterator[None]:
    """Context manager: BatchNorm layers of ``model`` do not update running stats.

    Works by setting ``track_running_stats = False`` on every ``_BatchNorm``
    module (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) for the duration of the
    block and restoring the previous value afterwards, even on error. In eval
    mode the layers keep using their running statistics, as before.

    Args:
        model: the network; ``None`` makes this a no-op, so optimizers can call
            it unconditionally.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> before = net[1].running_mean.clone()
        >>> with disable_running_stats(net):
        ...     _ = net(torch.randn(8, 3))
        >>> bool(torch.equal(before, net[1].running_mean))
        True
    """
    if model is None:
        yield
        return
    saved = []
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            saved.append((module, module.track_running_stats))
            module.track_running_stats = False
    try:
        yield
    finally:
        for module, flag in saved:
            module.track_running_stats = flag
