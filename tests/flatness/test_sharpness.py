"""Sharpness measures against plain references."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
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


def test_sharpness_uses_eval_mode_batchnorm_and_restores_mode() -> None:
    """With BatchNorm, both measures use the running statistics (eval mode) and leave train mode as found."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(30, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    model.train()
    model(x)  # move the running statistics away from their initial values
    model[1].running_mean.mul_(3.0)
    stats = model[1].running_mean.clone()
    got = adversarial_sharpness(model, nn.functional.cross_entropy, [(x, y)], rho=0.1)
    assert model.training and torch.equal(model[1].running_mean, stats)
    ref = copy.deepcopy(model).eval()
    loss = nn.functional.cross_entropy(ref(x), y)
    g = torch.autograd.grad(loss, list(ref.parameters()))
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    with torch.no_grad():
        for p, gi in zip(ref.parameters(), g):
            p.add_(0.1 * gi / norm)
    assert abs(got - (nn.functional.cross_entropy(ref(x), y).item() - loss.item())) < 1e-10
    base = mean_loss(model.eval(), nn.functional.cross_entropy, [(x, y)])
    model.train()
    train_mode = nn.functional.cross_entropy(model(x), y).item()
    assert abs(base.item() - loss.item()) < 1e-12 and abs(train_mode - loss.item()) > 1e-3


def test_report_curvature_matches_dense_hessian_from_one_operator(monkeypatch) -> None:
    """lambda_max (and the trace) in the report equal a float64 dense Hessian by torch.func.hessian, from ONE operator."""
    from torch.func import functional_call, hessian

    import flatness.curvature as curvature
    from flatness.report.compare import CompareSettings, _curvature

    model, batches, loss_fn, x, y = _setup()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def full_loss(flat: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = flat[i : i + s.numel()].view(s)
            i += s.numel()
        return loss_fn(functional_call(model, parts, (x,)), y)

    dense = hessian(full_loss)(flat0)
    exact = torch.linalg.eigvalsh(dense).flip(0)
    built = []
    real = curvature.HessianOperator
    monkeypatch.setattr(curvature, "HessianOperator", lambda *a, **k: built.append(1) or real(*a, **k))
    fake = SimpleNamespace(model=model, loss_fn=loss_fn, batches=batches)
    out = _curvature(fake, CompareSettings(top_k=3, tol=1e-8, trace_matvecs=200, density=True))
    assert len(built) == 1
    assert out["top_eigenvalues"] == pytest.approx(exact[:3].tolist(), rel=1e-6)
    assert out["trace"] == pytest.approx(float(dense.trace()), rel=1e-6)
    assert "density" in out and out["hvp_count"] > 200
