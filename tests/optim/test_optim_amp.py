"""Autocast (bf16 on CPU) and GradScaler."""

from __future__ import annotations

import pytest
import torch
from optim_helpers import METHODS, batches, make_closure, make_opt, model, snapshot


def _scaler(init_scale=2.0**10):
    return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)


@pytest.mark.parametrize("name", list(METHODS))
def test_autocast_bf16_trains(name):
    net = model()
    opt = make_opt(name, net)
    losses = []
    for _ in range(4):
        for x, y in batches(4):
            losses.append(opt.step(make_closure(opt, net, x, y, autocast=True)).detach().float().mean())
    assert all(torch.isfinite(l) for l in losses)
    assert float(torch.stack(losses[-4:]).mean()) < float(torch.stack(losses[:4]).mean())


@pytest.mark.parametrize("name", list(METHODS))
def test_grad_scaler_gives_the_unscaled_result(name):
    """A power-of-two scale is exact, so scaled and unscaled runs agree closely."""
    data_batches = batches(4)
    net_a = model()
    opt_a = make_opt(name, net_a)
    for x, y in data_batches:
        opt_a.step(make_closure(opt_a, net_a, x, y))
    net_b = model()
    scaler = _scaler()
    opt_b = make_opt(name, net_b, grad_scaler=scaler)
    for x, y in data_batches:
        opt_b.step(make_closure(opt_b, net_b, x, y, scaler=scaler))
    a, b = snapshot(net_a), snapshot(net_b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    for p_a, p_b in zip(net_a.parameters(), net_b.parameters()):
        if "fisher" in opt_a.state[p_a]:
            torch.testing.assert_close(opt_a.state[p_a]["fisher"], opt_b.state[p_b]["fisher"])


@pytest.mark.parametrize("name", ["arwp", "m-arwp", "sam"])
def test_overflow_step_is_skipped_and_accumulator_untouched(name):
    net = model()
    scaler = _scaler()
    opt = make_opt(name, net, grad_scaler=scaler)
    data_batches = batches(2)
    x, y = data_batches[0]
    opt.step(make_closure(opt, net, x, y, scaler=scaler))
    weights = snapshot(net)
    fisher = {p: opt.state[p]["fisher"].clone() for p in net.parameters() if "fisher" in opt.state[p]}
    momentum = {p: opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in net.parameters()}
    x, y = data_batches[1]
    good = make_closure(opt, net, x, y, scaler=scaler)

    def overflowing():
        loss = good()
        next(net.parameters()).grad.fill_(float("inf"))
        return loss

    opt.step(overflowing)
    after = snapshot(net)
    for k in weights:
        if "running" in k or "num_batches" in k:
            continue
        assert torch.equal(weights[k], after[k]), k
    for p, f in fisher.items():
        assert torch.equal(opt.state[p]["fisher"], f)
    for p, m in momentum.items():
        assert torch.equal(opt.base_optimizer.state[p]["momentum_buffer"], m)
    assert scaler.get_scale() == 2.0**9
