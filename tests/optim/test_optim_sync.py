"""No host synchronisation inside step(): .item(), .cpu(), .tolist(), bool(tensor) ... raise."""

from __future__ import annotations

import pytest
import torch
from optim_helpers import METHODS, batches, forbid_host_sync, make_closure, make_opt, model


@pytest.mark.parametrize("name", list(METHODS))
def test_step_never_syncs_with_the_host(name):
    net = model()
    opt = make_opt(name, net)
    for x, y in batches(4):  # 4 calls: every phase, accumulators initialised and used
        closure = make_closure(opt, net, x, y)
        with forbid_host_sync():
            opt.step(closure)


def test_the_guard_works():
    with forbid_host_sync():
        with pytest.raises(AssertionError, match="host sync"):
            torch.ones(()).item()
        with pytest.raises(AssertionError, match="host sync"):
            if torch.ones(()):
                pass
        with pytest.raises(AssertionError, match="host sync"):
            torch.ones(2).tolist()
    assert torch.ones(()).item() == 1.0
