"""Two real gloo processes give the same eigenvalues, trace and density as one process."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import REPO
from tests.flatness.curvature import dist_worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    single = dist_worker.compute()
    # spawned workers unpickle dist_worker.run by module name; pytest's importlib mode keeps the
    # checkout off sys.path, and spawn children start from the parent's sys.path
    monkeypatch.syspath_prepend(str(REPO))
    mp.spawn(dist_worker.run, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # the 3 batches are sharded 2 + 1, and every rank holds the same global operator
    assert [r["local_batches"] for r in ranks] == [2, 1]
    assert ranks[0]["samples"] == ranks[1]["samples"] == single["samples"] == 100
    for key in ("eigenvalues", "trace", "nodes", "hvp_count", "converged"):
        assert ranks[0][key] == ranks[1][key], key  # all-reduce keeps the ranks bit-identical
    two = ranks[0]
    assert two["converged"] and single["converged"]
    assert torch.allclose(torch.tensor(two["eigenvalues"]), torch.tensor(single["eigenvalues"]), rtol=1e-10, atol=0)
    assert two["trace"] == pytest.approx(single["trace"], rel=1e-10)
    assert torch.allclose(torch.tensor(two["nodes"]), torch.tensor(single["nodes"]), rtol=1e-8, atol=1e-10)
