"""optim/delta_sam.py: the reconstructed delta-SAM."""

from __future__ import annotations

import pytest
import torch
from optim_helpers import assert_same, batches, make_closure, model, snapshot, train

from flatness import optim
from flatness.optim.delta_sam import instance_weights


def test_weights_have_mean_one_and_favour_unguarded_instances():
    clean = torch.tensor([1.0, 1.0, 1.0, 1.0])
    probes = torch.tensor([[1.0, 1.1, 1.5, 0.2], [1.0, 0.9, 1.4, 0.1]])  # changes 0, .1, .45, .85
    w = instance_weights(probes, clean, temperature=1.0)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    assert torch.all(w[1:] > w[:-1])


def test_large_temperature_gives_uniform_weights():
    probes, clean = torch.rand(3, 8), torch.rand(8)
    torch.testing.assert_close(instance_weights(probes, clean, 1e9), torch.ones(8))


def test_large_temperature_is_sam():
    data_batches = batches(3)
    net = model()
    train(optim.SAM(net.parameters(), torch.optim.SGD, lr=0.1, rho=0.05, model=net), net, data_batches)
    sam = snapshot(net)
    net = model()
    opt = optim.DeltaSAM(net.parameters(), torch.optim.SGD, lr=0.1, rho=0.05, temperature=1e9, model=net)
    train(opt, net, data_batches)
    for k, v in snapshot(net).items():
        torch.testing.assert_close(v, sam[k], rtol=1e-5, atol=1e-6)


def test_probes_restore_weights_exactly_and_freeze_bn():
    net = model()
    opt = optim.DeltaSAM(net.parameters(), torch.optim.SGD, lr=0.1, model=net, num_perturbations=4)
    x, y = batches(1)[0]
    before = snapshot(net)
    probes = opt.probe_losses(make_closure(opt, net, x, y))
    assert probes.shape == (4, len(y))
    assert_same(snapshot(net), before)


def test_closure_calls_and_contract():
    net = model()
    opt = optim.DeltaSAM(net.parameters(), torch.optim.SGD, lr=0.1, model=net, num_perturbations=3)
    x, y = batches(1)[0]
    forward = make_closure(opt, net, x, y)
    calls = []

    def counted():
        calls.append(torch.is_grad_enabled())
        return forward()

    loss = opt.step(counted)
    assert calls == [False, False, False, True, True]
    assert loss.dim() == 0
    with pytest.raises(ValueError, match=r"per-sample losses of shape \(batch,\), got \(\)"):
        opt.step(lambda: forward().mean())
    assert optim.DeltaSAM.per_sample_closure and not optim.SAM.per_sample_closure


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_an_ordinary_closure_gets_a_message_saying_what_to_return(reduction):
    """The closure every other optimizer takes (forward + backward) fails in the
    probes with torch's "element 0 of tensors does not require grad"; DeltaSAM
    says instead what its closure must do, and leaves the weights alone."""
    net = model()
    opt = optim.DeltaSAM(net.parameters(), torch.optim.SGD, lr=0.1, model=net)
    x, y = batches(1)[0]

    def ordinary():
        losses = torch.nn.functional.cross_entropy(net(x), y, reduction=reduction)
        losses.mean().backward()
        return losses

    before = snapshot(net)
    with pytest.raises(ValueError, match=r"forward pass only.*per-sample losses.*without calling backward"):
        opt.step(ordinary)
    assert_same(snapshot(net), before)
    assert opt.num_updates == 0


def test_a_backward_inside_the_clean_pass_is_refused():
    """A closure that backpropagates only when gradients are enabled passes the
    probes; the clean pass then finds gradients it did not make."""
    net = model()
    opt = optim.DeltaSAM(net.parameters(), torch.optim.SGD, lr=0.1, model=net)
    x, y = batches(1)[0]

    def sneaky():
        losses = torch.nn.functional.cross_entropy(net(x), y, reduction="none")
        if torch.is_grad_enabled():
            losses.mean().backward(retain_graph=True)
        return losses

    with pytest.raises(ValueError, match="calls backward"):
        opt.step(sneaky)
