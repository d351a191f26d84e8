"""Worker of test_distributed.py: one rank of a 2-process gloo group (launched by torch.multiprocessing.spawn)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from flatness.curvature import HessianOperator, hutchpp_trace, lanczos_top_eigs, slq_density
from tests.flatness.curvature.problems import LOSS, make_batches, make_model


def run(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = compute()
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def compute() -> dict:
    """The same computation in one process or per rank (the operator shards when a group is initialized)."""
    H = HessianOperator(make_model("cnn1d_bn"), LOSS, make_batches(), dtype=torch.float64)
    eig = lanczos_top_eigs(H, k=5, tol=1e-10)
    trace = hutchpp_trace(H, 30)
    density = slq_density(H, 20, 1)
    return {
        "local_batches": len(H._batches),
        "samples": H.num_samples,
        "eigenvalues": eig.eigenvalues.tolist(),
        "converged": eig.converged,
        "hvp_count": eig.hvp_count,
        "trace": trace.trace,
        "nodes": density.nodes.tolist(),
    }
