"""Process body of the two-role parallel test (importable by spawned children)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from optim_helpers import batches, forbid_host_sync, make_closure, model

from flatness import optim

HYPER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "sigma": 0.05, "lam": 0.3, "eta": 0.5, "beta": 0.9}


class SimulatedOOM(RuntimeError):
    pass


def run(rank: int, world_size: int, out_dir: str, steps: int, fail_at: int | None = None) -> None:
    """``fail_at``: at that step the closure raises on every rank (after its backward),
    the step is retried on the same batch - the run must equal an unbroken one."""
    torch.set_num_threads(1)
    # Rendezvous through a file in the test's own folder: no port to race other processes for.
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank, world_size=world_size
    )
    try:
        net = model(seed=1 if rank == 0 else 2)  # rank 1 starts elsewhere: sync_init must fix it
        opt = optim.ParallelMARWP(net.parameters(), torch.optim.SGD, model=net, seed=0, **HYPER)
        data = batches(world_size * steps)
        for k in range(steps):
            x, y = data[world_size * k + rank]  # clean rank: batches 0, 2, ...; perturbed: 1, 3, ...
            closure = make_closure(opt, net, x, y)
            if k == fail_at:
                weights = [p.detach().clone() for p in net.parameters()]
                pointers = [p.data_ptr() for p in net.parameters()]

                def breaking(closure=closure):
                    closure()
                    raise SimulatedOOM("CUDA out of memory (simulated)")

                try:
                    opt.step(breaking)
                except SimulatedOOM:
                    pass
                else:
                    raise AssertionError("the closure's exception was swallowed")
                assert [p.data_ptr() for p in net.parameters()] == pointers
                assert all(torch.equal(p, w) for p, w in zip(net.parameters(), weights))
                assert opt.rng.counter == k - 1 and opt.num_updates == k
            if k == 0:
                opt.step(closure)
            else:
                with forbid_host_sync():
                    opt.step(closure)
        torch.save(
            {
                "role": opt.role,
                "model": net.state_dict(),
                "fisher": [opt.state[p]["fisher"] for p in net.parameters()],
                "momentum": [opt.base_optimizer.state[p]["momentum_buffer"] for p in net.parameters()],
                "opt": opt.state_dict(),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        # Every rank meets here before the group goes: a rank whose peer already tore down its
        # gloo context can abort in the destructor ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
