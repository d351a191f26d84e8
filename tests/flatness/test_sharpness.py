"""Sharpness measures against plain references."""

from __future__ import annotations

import torch
from torch import nn

from flatness.sharpness import adversarial_sharpness, mean_loss, random_sharpness


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(30, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    return model, [(x[:12], y[:12]), (x[12:], y[12:])], nn.functional.cross_entropy, x, y


def test_mean_loss_is_sample_weighted() -> None:
    model, batches, loss_fn, x, y = _setup()
    torch.testing.assert_close(mean_loss(model, loss_fn, batches), loss_fn(model(x), y).detach())


def test_random_sharpness_matches_reference_loop() -> None:
    model, batches, loss_fn, x, y = _setup()
    before = [p.clone() for p in model.parameters()]
    curve = random_sharpness(model, loss_fn, batches, radii=[0.0, 0.05, 0.2], draws=3, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert curve.loss_increase[0] == 0.0
    # reference: the same draws, one radius at a time, full batch
    gen = torch.Generator().manual_seed(7)
    draws = []
    for _ in range(3):
        d = []
        for p in before:
            scale = p.reshape(p.shape[0], -1).norm(dim=1).view(-1, *([1] * (p.dim() - 1))) if p.dim() > 1 else p.norm()
            d.append(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
        draws.append(d)
    base = loss_fn(model(x), y).item()
    for r, got in zip([0.05, 0.2], curve.loss_increase[1:]):
        vals = []
        for d in draws:
            m = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
            with torch.no_grad():
                for q, w, e in zip(m.parameters(), before, d):
                    q.copy_(w + r * e)
            vals.append(loss_fn(m(x), y).item() - base)
        assert abs(sum(vals) / 3 - got) < 1e-12
    assert curve.loss_increase[2] > 0 and len(curve.stderr) == 3


def test_adversarial_sharpness_matches_manual_step() -> None:
    model, batches, loss_fn, x, y = _setup()
    got = adversarial_sharpness(model, loss_fn, batches, rho=0.1)
    loss = loss_fn(model(x), y)
    g = torch.autograd.grad(loss, list(model.parameters()))
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    m = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for q, p, gi in zip(m.parameters(), model.parameters(), g):
            q.copy_(p + 0.1 * gi / norm)
    ref = loss_fn(m(x), y).item() - loss.item()
    assert abs(got - ref) < 1e-10 and got > 0
