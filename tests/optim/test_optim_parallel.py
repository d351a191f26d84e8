"""optim/parallel.py: two real gloo processes against the single-process computation."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from optim_helpers import batches, make_closure, model, snapshot
from optim_parallel_worker import HYPER, run

from flatness import optim

STEPS = 3

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    mp.spawn(run, args=(2, str(out), STEPS), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def ranks_after_failures(tmp_path_factory):
    """The closure raises on both ranks at the first step (accumulators just created)."""
    out = tmp_path_factory.mktemp("parallel_fail")
    mp.spawn(run, args=(2, str(out), STEPS, 0), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_a_failed_step_is_undone_on_every_rank(ranks, ranks_after_failures):
    """Retrying after the exception gives bitwise the unbroken run, on both roles.
    (BatchNorm running statistics excepted: the clean rank's forward pass before the
    exception recorded them, as it would with any optimizer.)"""
    for unbroken, retried in zip(ranks, ranks_after_failures):
        for k in unbroken["model"]:
            if "running" in k or "num_batches" in k:
                continue
            assert torch.equal(unbroken["model"][k], retried["model"][k]), k
        for a, b in zip(unbroken["fisher"] + unbroken["momentum"], retried["fisher"] + retried["momentum"]):
            assert torch.equal(a, b)
        assert unbroken["opt"]["wrapper"] == retried["opt"]["wrapper"]


def test_roles(ranks):
    assert [r["role"] for r in ranks] == ["clean", "perturbed"]


def test_all_ranks_hold_identical_weights_buffers_and_state(ranks):
    a, b = ranks
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for fa, fb in zip(a["fisher"] + a["momentum"], b["fisher"] + b["momentum"]):
        assert torch.equal(fa, fb)
    assert a["opt"]["wrapper"]["rng"]["counter"] == b["opt"]["wrapper"]["rng"]["counter"] == STEPS - 1


def test_equals_single_process_alternate_marwp(ranks):
    """Clean batch t on rank 0 + perturbed batch t+1 on rank 1 == MARWP(mix_batches='alternate')."""
    net = model(seed=1)
    opt = optim.MARWP(net.parameters(), torch.optim.SGD, model=net, seed=0, mix_batches="alternate", **HYPER)
    for x, y in batches(2 * STEPS):
        opt.step(make_closure(opt, net, x, y))
    assert opt.num_updates == STEPS
    expected = snapshot(net)
    for k, v in ranks[0]["model"].items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6, msg=k)
    for f, p in zip(ranks[0]["fisher"], net.parameters()):
        torch.testing.assert_close(f, opt.state[p]["fisher"], rtol=1e-5, atol=1e-8)
