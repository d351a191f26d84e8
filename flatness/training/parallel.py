"""Data-parallel training under ``torchrun``: the glue the loop needs.

Each rank takes every ``world_size``-th sample of the global batch, and the
gradients are averaged with one coalesced all-reduce after each backward,
so every rank applies the same update (the optimizers draw their noise from
identically seeded generators, so perturbations agree too). BatchNorm
buffers are averaged at the end of each epoch. With one process every hook
is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flatness.distributed import DistInfo
from flatness.errors import FlatnessError
from flatness.training.config import TrainConfig


@dataclass
class TrainParallel:
    """Per-rank batch slicing and gradient / buffer averaging.

    With ``--parallel-roles`` the optimizer (:class:`flatness.optim.ParallelMARWP`)
    does its own all-reduce (clean and perturbed roles) and buffer sync, so
    only the batch slicing and the metric sums are left here.
    """

    model: nn.Module
    info: DistInfo
    roles: bool = False

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
    def create(cls, model: nn.Module, config: TrainConfig, info: DistInfo) -> TrainParallel:
        cls.check(config, info)
        if info.active:
            for t in list(model.parameters()) + list(model.buffers()):  # start every rank from rank 0's state
                dist.broadcast(t.data, 0)
        return cls(model, info, config.parallel_roles)

    def local_indices(self, idx: Tensor) -> Tensor:
        if not self.info.active:
            return idx
        return idx[self.info.rank :: self.info.world_size]

    def after_backward(self) -> None:
        if not self.info.active or self.roles:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.info.world_size
        for g, part in zip(grads, torch.split(flat, [g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def sync_buffers(self) -> None:
        if not self.info.active or self.roles:
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
