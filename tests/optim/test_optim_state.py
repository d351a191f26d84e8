"""state_dict() / load_state_dict(): a resumed run continues bit for bit."""

from __future__ import annotations

import pytest
import torch
from optim_helpers import METHODS, assert_same, batches, make_opt, model, roundtrip, snapshot, train

from flatness import optim


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("split", [2, 3])  # 3: mid-pair for "alternate"
def test_round_trip_continues_bitwise(name, split):
    data_batches = batches(6)
    net = model()
    opt = make_opt(name, net)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for x, y in data_batches[:split]:
        train(opt, net, [(x, y)])
        sched.step()
    checkpoint = roundtrip(
        {"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    )
    train(opt, net, data_batches[split:])
    uninterrupted = snapshot(net)

    resumed_net = model(seed=123)  # different init: everything must come from the checkpoint
    resumed_net.load_state_dict(checkpoint["model"])
    resumed = make_opt(name, resumed_net, seed=999)
    resumed_sched = torch.optim.lr_scheduler.StepLR(resumed, step_size=2, gamma=0.5)
    resumed.load_state_dict(checkpoint["opt"])
    resumed_sched.load_state_dict(checkpoint["sched"])
    assert resumed.base_optimizer.param_groups is resumed.param_groups
    train(resumed, resumed_net, data_batches[split:])
    assert_same(snapshot(resumed_net), uninterrupted)
    assert resumed.num_updates == opt.num_updates


def test_state_dict_holds_every_piece():
    net = model()
    opt = make_opt("m-arwp-alt", net)
    train(opt, net, batches(3))
    state = opt.state_dict()
    assert any("momentum_buffer" in s for s in state["base_optimizer"]["state"].values())
    assert all("fisher" in s for s in state["state"].values())
    wrapper = state["wrapper"]
    assert wrapper["num_updates"] == 1 and wrapper["phase"] == 1
    assert wrapper["rng"]["seed"] == 0 and wrapper["rng"]["counter"] == 0
    assert sum(g is not None for g in wrapper["clean_grads"]) == len(list(net.parameters()))


def test_fisher_is_per_row_not_a_gradient_copy():
    net = model()
    opt = make_opt("arwp", net)
    train(opt, net, batches(1))
    for p in net.parameters():
        fisher = opt.state[p]["fisher"]
        assert fisher.shape == ((p.shape[0],) if p.dim() > 1 else p.shape)


def test_loading_a_foreign_state_dict_is_refused():
    net = model()
    opt = make_opt("sam", net)
    plain = torch.optim.SGD(net.parameters(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match="base_optimizer"):
        opt.load_state_dict(plain)


def test_state_dict_between_first_and_second_step_is_refused():
    net = model()
    opt = make_opt("rwp", net)
    opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()


def test_seed_controls_the_noise():
    data_batches = batches(2)
    runs = []
    for seed in (0, 0, 1):
        net = model()
        train(make_opt("m-arwp", net, seed=seed), net, data_batches)
        runs.append(snapshot(net))
    assert_same(runs[0], runs[1])
    assert not torch.equal(runs[0]["conv.weight"], runs[2]["conv.weight"])


def test_noise_does_not_touch_the_global_generator():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    net = model(seed=7)
    torch.manual_seed(5)
    opt = optim.RWP(net.parameters(), torch.optim.SGD, lr=0.1, sigma=0.1)
    train(opt, net, batches(2))
    assert torch.equal(torch.rand(3), expected)
