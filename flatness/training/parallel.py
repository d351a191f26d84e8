"""Data-parallel training under ``torchrun`` through :class:`torch.nn.parallel.DistributedDataParallel`.

Each rank takes every ``world_size``-th sample of the global batch and runs
its passes through a DDP wrapper, which all-reduces (averages) the
gradients in buckets overlapped with backward, so every rank applies the
same update (the optimizers draw their noise from identically seeded
generators, so random perturbations agree too).

- SAM family (SAM, ASAM): the first (ascent) pass runs under
  ``no_sync()``, so each rank perturbs its weights by its own gradient and
  only the second pass is averaged: the per-rank perturbation of Foret et
  al. 2021 ("m-sharpness"), as davda54/sam documents for DDP.
- RWP family: every pass is averaged (the perturbed gradient, and for
  m-(A)RWP the clean one as well).
- ``--parallel-roles``: the two-role m-(A)RWP does its own all-reduce and
  buffer sync; no DDP wrapper.

``gradient_as_bucket_view=True`` (gradients live in DDP's buckets, no
extra copy). m-(A)RWP keeps the clean gradient aside while the perturbed
pass runs; a bucket view would be overwritten by that pass, so the
optimizer clones a stashed gradient that is a view into a shared buffer
(:mod:`flatness.optim`); tests/cli/test_train_distributed.py checks the
m-ARWP result against one process with a large sigma. BatchNorm buffers are
broadcast once at construction, not per forward; they are averaged at the
end of each epoch. With one process every hook is a no-op.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from flatness.distributed import DistInfo
from flatness.errors import FlatnessError
from flatness.training.config import TrainConfig

@dataclass
class TrainParallel:
    """Per-rank batch slicing, the DDP wrapper, and buffer / metric averaging.

    Attributes:
        model: the network itself (evaluation, checkpoints, the optimizer).
        info: rank and world size.
        ddp: the DDP wrapper the training passes run through (None with one
            process or with ``--parallel-roles``).
        per_rank_first_pass: run the first pass of each step without
            gradient averaging (SAM family).
    """

    model: nn.Module
    info: DistInfo
    ddp: DistributedDataParallel | None = None
    per_rank_first_pass: bool = False

    @staticmethod
    def check(config: TrainConfig, info: DistInfo) -> None:
        """Refuse settings that cannot run with this many processes."""
        if config.parallel_roles and not info.active:
            raise FlatnessError("--parallel-roles needs several processes: run under torchrun --nproc_per_node 2 (or any even number)")
        if config.parallel_roles and info.world_size % 2:
            raise FlatnessError(f"--parallel-roles needs an even number of processes, got {info.world_size}")
        if info.active and config.method == "delta-sam":
            raise FlatnessError("delta-sam does not run data-parallel yet; run it in one process")

    @classmethod
    def create(cls, model: nn.Module, config: TrainConfig, info: DistInfo, *, per_rank_first_pass: bool = False) -> TrainParallel:
        """Wrap ``model`` (DDP broadcasts rank 0's parameters and buffers to every rank)."""
        cls.check(config, info)
        if not info.active:
            return cls(model, info)
        if config.parallel_roles:
            for t in list(model.parameters()) + list(model.buffers()):  # start every rank from rank 0's state
                dist.broadcast(t.data, 0)
            return cls(model, info)
        ddp = DistributedDataParallel(
            model,
            forward_sync_buffers=False,  # buffers: broadcast once here, averaged at epoch ends
            gradient_as_bucket_view=True,
        )
        return cls(model, info, ddp, per_rank_first_pass)

    @property
    def module(self) -> nn.Module:
        """What the training passes call: the DDP wrapper, or the model itself."""
        return self.ddp if self.ddp is not None else self.model

    def pass_context(self, pass_index: int) -> contextlib.AbstractContextManager:
        """``no_sync()`` for the SAM family's first pass, nothing otherwise."""
        if self.ddp is not None and self.per_rank_first_pass and pass_index == 0:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def release(self) -> None:
        """Drop the DDP wrapper (and its reducer, which holds the process group) before the group is destroyed.

        Freed later, after ``destroy_process_group``, the reducer's last reference to the gloo
        group runs the group's destructor, which joins its worker threads; if a peer has already
        exited, that join can wait forever.
        """
        self.ddp = None
        gc.collect()

    def local_indices(self, idx: Tensor) -> Tensor:
        if not self.info.active:
            return idx
        return idx[self.info.rank :: self.info.world_size]

    def sync_buffers(self) -> None:
        if self.ddp is None:
            return
        for buf in self.model.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf /= self.info.world_size

    def reduce_sums(self, sums: Tensor) -> Tensor:
        if not self.info.active:
            return sums
        out = sums.clone()
        dist.all_reduce(out)
        return out


def allreduce_gradients(model: nn.Module, world_size: int) -> None:
    """The previous engine, kept for ``benchmarks/ddp.py``: one coalesced all-reduce after backward."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    for g, part in zip(grads, torch.split(flat, [g.numel() for g in grads])):
        g.copy_(part.view_as(g))
