"""Every method trains; variants agree with the base optimizer where the math says."""

from __future__ import annotations

import pytest
import torch
from optim_helpers import (
    METHODS,
    assert_same,
    batches,
    make_closure,
    make_opt,
    model,
    snapshot,
    train,
)

from flatness import optim


def _sgd_run(net, data_batches, **kwargs):
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, **kwargs)
    for x, y in data_batches:
        opt.zero_grad()
        make_closure(opt, net, x, y)()
        opt.step()
    return snapshot(net)


@pytest.mark.parametrize("name", list(METHODS))
def test_training_loss_falls(name):
    torch.manual_seed(0)
    net = model()
    opt = make_opt(name, net)
    data_batches = batches(6)
    full_x = torch.cat([x for x, _ in data_batches])
    full_y = torch.cat([y for _, y in data_batches])

    def full_loss():
        net.eval()
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(net(full_x), full_y)
        net.train()
        return float(loss)

    before = full_loss()
    for _ in range(8):
        train(opt, net, data_batches)
    after = full_loss()
    assert after < 0.7 * before, f"{name}: loss {before:.3f} -> {after:.3f}"


@pytest.mark.parametrize("name", ["m-rwp", "m-arwp"])
def test_lam_zero_is_the_base_optimizer(name):
    data_batches = batches(4)
    expected = _sgd_run(model(), data_batches)
    net = model()
    opt = make_opt(name, net, lam=0.0)
    train(opt, net, data_batches)
    assert_same(snapshot(net), expected)


def test_lam_zero_alternate_is_base_optimizer_on_clean_batches():
    data_batches = batches(6)
    expected = _sgd_run(model(), data_batches[0::2])
    net = model()
    opt = make_opt("m-arwp-alt", net, lam=0.0)
    train(opt, net, data_batches)
    assert opt.num_updates == 3
    # BN statistics: the perturbed batches must not have been recorded either
    assert_same(snapshot(net), expected)


@pytest.mark.parametrize("name", ["rwp", "arwp", "m-rwp", "m-arwp"])
def test_sigma_zero_is_the_base_optimizer(name):
    data_batches = batches(4)
    expected = _sgd_run(model(), data_batches)
    net = model()
    opt = make_opt(name, net, sigma=0.0)
    train(opt, net, data_batches)
    assert_same(snapshot(net), expected)


def test_asam_without_scaling_is_sam():
    data_batches = batches(4)
    runs = []
    for cls, kwargs in [(optim.SAM, {}), (optim.ASAM, {"adaptive": False})]:
        net = model()
        params = [{"params": list(net.parameters()), **kwargs}]
        opt = cls(params, torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.05, model=net)
        train(opt, net, data_batches)
        runs.append(snapshot(net))
    assert_same(*runs)


def _asam_reference_eps(net, x, y, adaptive_names, rho, eta):
    """epsilon = rho T^2 g / (||T g|| + 1e-12), T = |w| + eta on the adaptive
    parameters and 1 elsewhere; written out from the paper, float64."""
    loss = torch.nn.functional.cross_entropy(net(x), y)
    names = [n for n, _ in net.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in net.named_parameters()])
    scales = {
        n: (p.detach().abs() + eta) if n in adaptive_names else torch.ones_like(p)
        for n, p in net.named_parameters()
    }
    norm = torch.sqrt(sum(((scales[n] * g) ** 2).sum() for n, g in zip(names, grads)))
    return {n: rho * scales[n] ** 2 * g / (norm + 1e-12) for n, g in zip(names, grads)}


@pytest.mark.parametrize("rule", ["name", "ndim"])
def test_asam_groups_scale_only_the_adaptive_group(rule):
    x, y = batches(1)[0]
    x = x.double()
    net = model().double()
    groups = optim.asam_param_groups(net, rule=rule)
    adaptive_ids = {id(p) for p in groups[0]["params"]}
    adaptive_names = {n for n, p in net.named_parameters() if id(p) in adaptive_ids}
    expected_names = {n for n, p in net.named_parameters() if ("weight" in n if rule == "name" else p.dim() > 1)}
    assert adaptive_names == expected_names and groups[1]["adaptive"] is False
    assert ("bn.weight" in adaptive_names) == (rule == "name")  # the official code scales BN weights
    rho, eta = 0.5, 0.01
    reference = _asam_reference_eps(net, x, y, adaptive_names, rho, eta)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = optim.ASAM(groups, torch.optim.SGD, lr=0.1, rho=rho, adaptive_eta=eta, model=net)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.first_step()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach() - before[n], reference[n], rtol=1e-9, atol=1e-15)
    opt.second_step()
    # and with every parameter adaptive, the biases would have moved differently
    everything = _asam_reference_eps(model().double(), x, y, set(before), rho, eta)
    assert not torch.allclose(everything["fc.bias"], reference["fc.bias"])


def test_asam_param_groups_rejects_unknown_rule():
    with pytest.raises(ValueError, match="Unknown rule 'bias'"):
        optim.asam_param_groups(model(), rule="bias")


def test_asam_with_large_eta_tends_to_sam():
    """T_w = |w| + c ~ c: ASAM(rho / c, eta = c) -> SAM(rho) as c grows."""
    data_batches = batches(3)
    net = model()
    train(optim.SAM(net.parameters(), torch.optim.SGD, lr=0.1, rho=0.05, model=net), net, data_batches)
    sam = snapshot(net)
    errors = []
    for c in (1e2, 1e4):
        net = model()
        opt = optim.ASAM(net.parameters(), torch.optim.SGD, lr=0.1, rho=0.05 / c, adaptive_eta=c, model=net)
        train(opt, net, data_batches)
        errors.append(max(float((snapshot(net)[k] - sam[k]).abs().max()) for k in sam))
    assert errors[1] < 1e-4
    assert errors[1] < errors[0]


@pytest.mark.parametrize("name", list(METHODS))
def test_foreach_matches_single_tensor(name):
    data_batches = batches(5)
    runs = []
    for foreach in (True, False):
        net = model()
        opt = make_opt(name, net, foreach=foreach)
        train(opt, net, data_batches)
        runs.append((snapshot(net), opt.state_dict()))
    assert_same(runs[0][0], runs[1][0])
    state_a, state_b = runs[0][1]["state"], runs[1][1]["state"]
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        for key, value in state_a[k].items():
            assert torch.equal(value, state_b[k][key])


@pytest.mark.parametrize("name", list(METHODS))
def test_parameters_without_gradient_are_left_exactly_alone(name):
    net = model(unused=True)
    before = net.unused.weight.detach().clone()
    opt = make_opt(name, net, weight_decay=0.0)
    train(opt, net, batches(4))
    assert net.unused.weight.grad is None
    assert torch.equal(net.unused.weight, before)


@pytest.mark.parametrize("name", ["sam", "m-arwp"])
def test_gradient_methods_do_not_perturb_gradless_params(name):
    net = model(unused=True)
    opt = make_opt(name, net)
    x, y = batches(1)[0]
    seen = []
    closure = make_closure(opt, net, x, y)

    def spy():
        seen.append(net.unused.weight.detach().clone())
        return closure()

    opt.step(spy)
    assert len(seen) == 2
    assert torch.equal(seen[0], seen[1])


def test_step_returns_clean_loss_and_grad_holds_applied_gradient():
    net = model()
    opt = make_opt("m-rwp", net, lam=0.0)
    x, y = batches(1)[0]
    expected = make_closure(opt, net, x, y)()
    clean_grads = [p.grad.clone() for p in net.parameters()]
    opt.zero_grad()  # step(closure) refuses gradients left over from a pass of its own
    loss = opt.step(make_closure(opt, net, x, y))
    assert torch.equal(loss, expected)
    for p, g in zip(net.parameters(), clean_grads):
        assert torch.equal(p.grad, g)


def test_alternate_updates_every_second_call():
    net = model()
    opt = make_opt("m-arwp-alt", net)
    flags = []
    for x, y in batches(5):
        before = snapshot(net)
        opt.step(make_closure(opt, net, x, y))
        flags.append(opt.last_step_updated)
        changed = any(not torch.equal(before[k], v) for k, v in snapshot(net).items() if "weight" in k)
        assert changed == opt.last_step_updated
    assert flags == [False, True, False, True, False]
    assert opt.num_updates == 2


def test_custom_loop_first_second_step_matches_step():
    data_batches = batches(3)
    net_a = model()
    opt_a = make_opt("m-arwp", net_a)
    train(opt_a, net_a, data_batches)
    net_b = model()
    opt_b = make_opt("m-arwp", net_b)
    for x, y in data_batches:
        closure = make_closure(opt_b, net_b, x, y)
        opt_b.zero_grad()
        closure()
        opt_b.first_step()
        with optim.disable_running_stats(net_b):
            closure()
        opt_b.second_step()
    assert_same(snapshot(net_a), snapshot(net_b))


def test_lr_scheduler_drives_the_base_optimizer():
    net = model()
    opt = make_opt("m-arwp", net, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for x, y in batches(2):
        opt.step(make_closure(opt, net, x, y))
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.25
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.25
    assert opt.base_optimizer.param_groups is opt.param_groups


def test_step_without_closure_is_a_type_error():
    net = model()
    with pytest.raises(TypeError, match="needs a closure"):
        make_opt("sam", net).step()


def test_second_step_without_first_step_raises():
    net = model()
    with pytest.raises(RuntimeError, match="without a preceding first_step"):
        make_opt("sam", net).second_step()


@pytest.mark.parametrize("name", ["m-rwp", "m-arwp", "m-arwp-alt"])
def test_gradients_that_are_views_of_one_buffer_are_stashed_safely(name):
    """DDP with gradient_as_bucket_view=True hands out .grad as views into one
    bucket that every backward rewrites; the stashed clean gradient must not be
    overwritten by the perturbed pass. Simulated here without a process group."""
    data_batches = batches(4)
    net = model()
    train(make_opt(name, net), net, data_batches)
    expected = snapshot(net)

    net = model()
    opt = make_opt(name, net)
    params = list(net.parameters())
    bucket = torch.zeros(sum(p.numel() for p in params))

    def bucket_closure(x, y):
        def closure():
            loss = torch.nn.functional.cross_entropy(net(x), y)
            grads = torch.autograd.grad(loss, params)
            offset = 0
            for p, g in zip(params, grads):
                view = bucket[offset : offset + p.numel()].view_as(p)
                view.copy_(g)
                p.grad = view
                offset += p.numel()
            return loss.detach()

        return closure

    for x, y in data_batches:
        opt.step(bucket_closure(x, y))
    assert_same(snapshot(net), expected)
