"""torch.distributed helpers for running the same commands under ``torchrun``.

Nothing here runs on import. :func:`init_from_env` joins the process group
that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1), using
NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def info() -> DistInfo:
    """Rank and world size of the current process group (0, 1 when none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size())
    return DistInfo()


def init_from_env(device: torch.device) -> DistInfo:
    """Join the process group torchrun set up, if any; idempotent."""
    if dist.is_available() and dist.is_initialized():
        return info()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return info()


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[DistInfo]:
    """The process group of a command: joined on entry, destroyed on exit.

    The one owner of a group: the group is destroyed here only if it was
    created here (a caller that already joined one, e.g. a test harness or
    an enclosing command, keeps it). With one process it yields ``DistInfo()``.
    """
    created = not (dist.is_available() and dist.is_initialized())
    dist_info = init_from_env(device)
    try:
        yield dist_info
    except BaseException:
        if created and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if created and dist.is_available() and dist.is_initialized():
        # Every rank reaches the end before any tears its group down: a rank that left early would
        # leave a peer's last collective (and the gloo worker thread running it) waiting forever.
        dist.barrier()
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """Under torchrun with CUDA, each process takes GPU ``LOCAL_RANK``."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """Contiguous block of ``range(n)`` owned by ``rank`` (blocks differ by at most one)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
