"""The RWP family runs the perturbed pass on a second storage (no copy of w).

Checked against the copy path (``swap_storage = False``), which perturbs the
parameters in place and restores them by copy: the same noise, the same
weights and accumulators, bitwise; the parameters end on their own storage;
parameters that share a flat buffer fall back to in-place perturbation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from optim_helpers import assert_same, batches, make_closure, make_opt, model, snapshot

from flatness.optim.noise import filterwise_noise_, filterwise_noise_into

RANDOM = ["rwp", "arwp", "m-rwp", "m-arwp", "m-arwp-alt"]


def _run(name, swap, n_batches=4, **overrides):
    net = model()
    opt = make_opt(name, net, **overrides)
    opt.swap_storage = swap
    seen = []
    for x, y in batches(n_batches):
        closure = make_closure(opt, net, x, y)

        def recording(closure=closure):
            seen.append([p.detach().clone() for p in net.parameters()])  # the weights the pass sees
            return closure()

        opt.step(recording)
    return net, opt, seen


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", RANDOM)
def test_swap_is_bitwise_the_copy_path(name, foreach):
    net_a, opt_a, seen_a = _run(name, swap=True, foreach=foreach)
    net_b, opt_b, seen_b = _run(name, swap=False, foreach=foreach)
    assert_same(snapshot(net_a), snapshot(net_b))
    for pass_a, pass_b in zip(seen_a, seen_b, strict=True):  # the perturbed weights too
        for a, b in zip(pass_a, pass_b, strict=True):
            assert torch.equal(a, b)
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        for key, value in opt_a.state[pa].items():
            assert torch.equal(value, opt_b.state[pb][key])


@pytest.mark.parametrize("name", RANDOM)
def test_parameters_end_on_their_own_storage(name):
    net = model()
    opt = make_opt(name, net)
    pointers = [p.data_ptr() for p in net.parameters()]
    x, y = batches(1)[0]
    closure = make_closure(opt, net, x, y)
    during = []

    def recording():
        during.append([p.data_ptr() for p in net.parameters()])
        return closure()

    for _ in range(2):
        opt.step(recording)
    assert [p.data_ptr() for p in net.parameters()] == pointers
    assert any(ptrs != pointers for ptrs in during)  # the perturbed pass ran elsewhere


def test_noise_into_is_the_in_place_noise_and_leaves_w_alone():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, 2, 2, generator=g), torch.randn(4, 7, generator=g), torch.randn(6, generator=g)]
    fisher = [torch.rand(5, generator=g), torch.rand(4, generator=g), torch.rand(6, generator=g)]
    original = [p.clone() for p in params]
    out = [torch.empty_like(p) for p in params]
    filterwise_noise_into(params, out, sigma=0.1, fisher=fisher, eta=0.5, generator=torch.Generator().manual_seed(7))
    inplace = [p.clone() for p in params]
    filterwise_noise_(inplace, [torch.empty_like(p) for p in params], sigma=0.1, fisher=fisher, eta=0.5,
                      generator=torch.Generator().manual_seed(7))
    for p, o, w, ref in zip(params, out, original, inplace):
        assert torch.equal(p, w)
        assert torch.equal(o, ref)
        assert not torch.equal(o, w)


class FlatNet(torch.nn.Module):
    """Parameters are views into one flat buffer, and the forward reads the buffer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.flat = torch.randn(4 * 36 + 4 * 3 + 3) * 0.3
        self.w1 = torch.nn.Parameter(torch.empty(4, 36))
        self.w2 = torch.nn.Parameter(torch.empty(3, 4))
        self.b2 = torch.nn.Parameter(torch.empty(3))
        offset = 0
        for p in (self.w1, self.w2, self.b2):
            p.data = self.flat[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1 = self.flat[: 4 * 36].view(4, 36)  # through the buffer, not the parameter
        return F.linear(torch.relu(F.linear(x.flatten(1), w1)), self.w2, self.b2)


@pytest.mark.parametrize("name", ["rwp", "m-arwp"])
def test_parameters_sharing_a_buffer_are_perturbed_in_place(name):
    x, y = batches(1)[0]
    runs = []
    for swap in (True, False):
        net = FlatNet()
        opt = make_opt(name, net, sigma=0.1)
        opt.swap_storage = swap
        clean = net.flat.clone()
        flats = []

        def closure(net=net, flats=flats):
            flats.append(net.flat.clone())
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        assert not torch.equal(flats[-1], clean)  # the perturbed pass saw the noise through the buffer
        assert net.w1.data_ptr() == net.flat.data_ptr()
        runs.append(net.flat.clone())
    assert torch.equal(runs[0], runs[1])
