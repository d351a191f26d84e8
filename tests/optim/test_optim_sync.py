"""No host synchronisation inside step(): .item(), .cpu(), .tolist(), bool(tensor) ... raise.

Covered: every method, single-tensor and foreach kernels, with and without a
GradScaler. The one synchronisation that remains is GradScaler's own inf check
(``scaler.step`` reads ``found_inf`` on the host to decide whether to skip the
update); the optimizers add none of their own.
"""

from __future__ import annotations

import pytest
import torch
from optim_helpers import METHODS, allow_host_sync, batches, forbid_host_sync, make_closure, make_opt, model


def _scaler():
    return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", list(METHODS))
def test_step_never_syncs_with_the_host(name, foreach):
    net = model()
    opt = make_opt(name, net, foreach=foreach)
    for x, y in batches(4):  # 4 calls: every phase, accumulators initialised and used
        closure = make_closure(opt, net, x, y)
        with forbid_host_sync():
            opt.step(closure)
    assert opt.num_updates == (2 if name == "m-arwp-alt" else 4)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", list(METHODS))
def test_with_grad_scaler_only_its_inf_check_syncs(name, foreach, monkeypatch):
    """The guard is lifted inside GradScaler's inf check only; anything else that
    syncs (in the optimizer or the rest of the scaler) still raises."""
    inner = torch.amp.GradScaler._maybe_opt_step
    calls = []

    def inf_check(self, *args, **kwargs):
        calls.append(1)
        with allow_host_sync():
            return inner(self, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "_maybe_opt_step", inf_check)
    net = model()
    scaler = _scaler()
    opt = make_opt(name, net, foreach=foreach, grad_scaler=scaler)
    for x, y in batches(4):
        closure = make_closure(opt, net, x, y, scaler=scaler)
        with forbid_host_sync():
            opt.step(closure)
    updates = 2 if name == "m-arwp-alt" else 4
    assert opt.num_updates == len(calls) == updates


def test_grad_scaler_inf_check_does_sync():
    """What the README says: with a GradScaler, step() synchronises once per update."""
    net = model()
    scaler = _scaler()
    opt = make_opt("m-arwp", net, grad_scaler=scaler)
    x, y = batches(1)[0]
    closure = make_closure(opt, net, x, y, scaler=scaler)
    with forbid_host_sync(), pytest.raises(AssertionError, match="host sync"):
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
        with allow_host_sync():
            assert torch.ones(()).item() == 1.0
        with pytest.raises(AssertionError, match="host sync"):
            torch.ones(()).item()
    assert torch.ones(()).item() == 1.0
