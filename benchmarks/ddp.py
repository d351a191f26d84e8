"""Data-parallel step time: DistributedDataParallel vs the previous all-reduce vs one process.

Two gloo processes on this machine (one torch thread each) train the same
model on the same global batch, half per rank, with two engines:

* ``ddp``: :class:`torch.nn.parallel.DistributedDataParallel` with
  ``gradient_as_bucket_view=True``, bucketed all-reduce overlapped with
  backward (what ``flatness train`` uses now; SAM's first pass under
  ``no_sync()``);
* ``allreduce``: the previous engine (``flatness.training.parallel.allreduce_gradients``):
  after each backward, one all-reduce of all gradients concatenated into one
  flat buffer (no overlap, one extra gradient-sized copy each way).

and one process on the whole global batch (the ``single`` row). The step time is
the median over ``--steps`` steps after ``--warmup`` (rank 0's; the ranks
synchronise every step anyway). Both engines and the single process run in
this one invocation, interleaved, so machine load hits them alike.

    OMP_NUM_THREADS=1 python benchmarks/ddp.py                   # cnn1d, MNIST-1D shapes, ~1 min
    OMP_NUM_THREADS=1 python benchmarks/ddp.py --model resnet18 --batch-size 32 --steps 10
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from flatness.models import build_model
from flatness.optim import SAM
from flatness.training.parallel import allreduce_gradients


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name in ("mlp", "cnn1d"):
        return build_model(name, in_features=40, num_classes=10)
    return build_model(name, num_classes=10)


def _data(name: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (n, 40) if name in ("mlp", "cnn1d") else (n, 3, 32, 32)
    return torch.randn(shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def _optimizer(method: str, model: nn.Module) -> torch.optim.Optimizer:
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9, model=model)


def _steps(engine: str, method: str, args: argparse.Namespace, world: int) -> list[float]:
    """Step times (seconds) of one engine; ``engine`` is ``ddp``, ``allreduce`` or ``single``."""
    model = _model(args.model)
    rank = dist.get_rank() if engine != "single" else 0
    x, y = _data(args.model, args.batch_size)
    if engine != "single":
        x, y = x[rank::world], y[rank::world]
    fwd: nn.Module = model
    if engine == "ddp":
        fwd = DistributedDataParallel(model, gradient_as_bucket_view=True, forward_sync_buffers=False)
    opt = _optimizer(method, model)
    calls = {"n": 0}

    def closure() -> torch.Tensor:
        first = calls["n"] == 0
        calls["n"] += 1
        ctx = fwd.no_sync() if (engine == "ddp" and method == "sam" and first) else contextlib.nullcontext()
        with ctx:
            loss = F.cross_entropy(fwd(x), y)
            loss.backward()
        if engine == "allreduce":
            allreduce_gradients(model, world)
        return loss

    times = []
    for _ in range(args.warmup + args.steps):
        if engine != "single":
            dist.barrier()
        t0 = time.perf_counter()
        calls["n"] = 0
        opt.zero_grad(set_to_none=True)
        if method == "sgd":
            closure()
            opt.step()
        else:
            opt.step(closure)
        times.append(time.perf_counter() - t0)
    return times[args.warmup :]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue: mp.Queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out: dict[tuple[str, str], list[float]] = {}
        for rep in range(args.repeats):
            for method in args.methods:
                for engine in ("ddp", "allreduce") if rep % 2 == 0 else ("allreduce", "ddp"):
                    out.setdefault((method, engine), []).extend(_steps(engine, method, args, world))
        if rank == 0:
            queue.put(out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn1d")
    p.add_argument("--batch-size", type=int, default=256, help="global batch (each of the 2 ranks takes half)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="rounds, alternating the engine order")
    p.add_argument("--methods", nargs="+", default=["sgd", "sam"], choices=["sgd", "sam"])
    args = p.parse_args()
    torch.set_num_threads(1)
    world = 2
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    parallel = queue.get()
    for proc in procs:
        proc.join()
    single = {m: [t for _ in range(args.repeats) for t in _steps("single", m, args, 1)] for m in args.methods}
    n_params = sum(p.numel() for p in _model(args.model).parameters())
    print(f"model {args.model} ({n_params} parameters), global batch {args.batch_size}, 2 gloo processes x 1 thread, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"{'method':<6} {'engine':<10} {'step ms':>9} {'vs single':>10} {'vs allreduce':>13}")
    for m in args.methods:
        med = {e: statistics.median(parallel[(m, e)]) for e in ("ddp", "allreduce")}
        med["single"] = statistics.median(single[m])
        for e in ("single", "allreduce", "ddp"):
            print(f"{m:<6} {e:<10} {1e3 * med[e]:>9.2f} {med[e] / med['single']:>10.2f} {med[e] / med['allreduce']:>13.2f}")


if __name__ == "__main__":
    main()
