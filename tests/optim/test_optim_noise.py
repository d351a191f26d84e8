"""optim/noise.py: filter-wise noise, ARWP accumulator, sphere probes."""

from __future__ import annotations

import pytest
import torch

from flatness.optim.noise import (
    filterwise_noise_,
    filterwise_std,
    fisher_like,
    row_norms,
    row_sq_sums,
    sphere_noise_,
    update_fisher_,
)

SHAPES = [(5, 3, 2, 2), (7, 4), (6,), ()]


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def _fisher(params, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(fisher_like(p).shape, generator=g, dtype=p.dtype) * 3 for p in params]


def test_row_norms_against_loop():
    params = _params()
    for p, n in zip(params, row_norms(params)):
        if p.dim() > 1:
            expected = torch.stack([p[i].pow(2).sum().sqrt() for i in range(p.shape[0])])
        else:
            expected = p.pow(2).sum().sqrt()
        torch.testing.assert_close(n, expected)


def test_std_formula_against_reference():
    params, eta, sigma = _params(), 0.7, 0.03
    fisher = _fisher(params)
    stds = filterwise_std(params, sigma=sigma, fisher=fisher, eta=eta)
    for p, f, s in zip(params, fisher, stds):
        if p.dim() > 1:
            for i in range(p.shape[0]):
                expected = sigma * p[i].norm() / torch.sqrt(1 + eta * f[i])
                torch.testing.assert_close(s.reshape(-1)[i], expected)
            assert s.shape == (p.shape[0],) + (1,) * (p.dim() - 1)
        else:  # whole-tensor norm, element-wise divisor (official code)
            torch.testing.assert_close(s, sigma * p.norm() / torch.sqrt(1 + eta * f))
            assert s.shape == p.shape


@pytest.mark.parametrize("adaptive", [False, True])
def test_std_foreach_matches_single(adaptive):
    params = _params()
    fisher = _fisher(params) if adaptive else None
    a = filterwise_std(params, sigma=0.1, fisher=fisher, eta=0.3, foreach=True)
    b = filterwise_std(params, sigma=0.1, fisher=fisher, eta=0.3, foreach=False)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("adaptive", [False, True])
def test_noise_foreach_matches_single_and_backup_is_exact(adaptive):
    runs = []
    for foreach in (True, False):
        params = _params()
        original = [p.clone() for p in params]
        backups = [torch.empty_like(p) for p in params]
        gen = torch.Generator().manual_seed(3)
        fisher = _fisher(params) if adaptive else None
        filterwise_noise_(params, backups, sigma=0.1, fisher=fisher, eta=0.5, generator=gen, foreach=foreach)
        for b, o in zip(backups, original):
            assert torch.equal(b, o)
        runs.append(params)
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_empirical_row_std_matches_formula():
    """Per-row std of the drawn noise = sigma * ||W_i|| / sqrt(1 + eta * F_i)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40_000, generator=g) * torch.linspace(0.5, 2.0, 6)[:, None]
    fisher = [torch.tensor([0.0, 0.5, 1.0, 4.0, 10.0, 30.0])]
    sigma, eta = 0.02, 0.8
    p, b = w.clone(), torch.empty_like(w)
    filterwise_noise_([p], [b], sigma=sigma, fisher=fisher, eta=eta, generator=g)
    noise = p - w
    expected = sigma * w.norm(dim=1) / torch.sqrt(1 + eta * fisher[0])
    torch.testing.assert_close(noise.std(dim=1), expected, rtol=0.03, atol=0)
    torch.testing.assert_close(noise.mean(dim=1), torch.zeros(6), rtol=0, atol=float(3 * expected.max() / 200))


def test_empirical_std_of_vector_is_elementwise():
    """1-D tensors: whole-tensor norm, element-wise ARWP divisor."""
    g = torch.Generator().manual_seed(1)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    fisher = [torch.tensor([0.0, 1.0, 5.0, 20.0])]
    draws = []
    for _ in range(4000):
        p, b = w.clone(), torch.empty_like(w)
        filterwise_noise_([p], [b], sigma=0.1, fisher=fisher, eta=1.0, generator=g)
        draws.append(p - w)
    noise = torch.stack(draws)
    expected = 0.1 * w.norm() / torch.sqrt(1 + fisher[0])
    torch.testing.assert_close(noise.std(dim=0), expected, rtol=0.05, atol=0)


def test_sigma_zero_is_exact_noop():
    params = _params()
    original = [p.clone() for p in params]
    filterwise_noise_(params, [torch.empty_like(p) for p in params], sigma=0.0)
    for p, o in zip(params, original):
        assert torch.equal(p, o)


def _fisher_reference(grads_seq, beta):
    """The official code: fisher = beta * fisher + g**2 (full tensors), summed per row when used."""
    full = None
    for grads in grads_seq:
        sq = [g.double() ** 2 for g in grads]
        full = sq if full is None else [beta * f + s for f, s in zip(full, sq)]
    return [f.reshape(f.shape[0], -1).sum(1) if f.dim() > 1 else f for f in full]


@pytest.mark.parametrize("foreach", [True, False])
def test_fisher_update_matches_official_logic(foreach):
    beta = 0.9
    grads_seq = [_params(seed) for seed in (10, 11, 12)]
    fisher = [fisher_like(p) for p in grads_seq[0]]
    for grads in grads_seq:
        update_fisher_(fisher, grads, beta=beta, foreach=foreach)
    for f, ref in zip(fisher, _fisher_reference(grads_seq, beta)):
        torch.testing.assert_close(f, ref)
    # the first update sets F to ||g_i||^2 (no 1 - beta factor)
    first = [fisher_like(p) for p in grads_seq[0]]
    update_fisher_(first, grads_seq[0], beta=beta, foreach=foreach)
    for f, s in zip(first, row_sq_sums(grads_seq[0])):
        torch.testing.assert_close(f, s)


def test_fisher_foreach_matches_single():
    grads = _params(5)
    a = _fisher(grads)
    b = [f.clone() for f in a]
    update_fisher_(a, grads, beta=0.99, foreach=True, inv_scale=torch.tensor(0.25, dtype=torch.float64))
    update_fisher_(b, grads, beta=0.99, foreach=False, inv_scale=torch.tensor(0.25, dtype=torch.float64))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_fisher_sees_unscaled_gradients_and_skips_non_finite():
    grads = _params(6)
    plain = [fisher_like(p) for p in grads]
    scaled = [fisher_like(p) for p in grads]
    update_fisher_(plain, grads, beta=0.9)
    update_fisher_(scaled, [g * 1024 for g in grads], beta=0.9, inv_scale=torch.tensor(1 / 1024, dtype=torch.float64))
    for x, y in zip(plain, scaled):
        torch.testing.assert_close(x, y)
    before = [f.clone() for f in plain]
    bad = [g.clone() for g in grads]
    bad[1][0, 0] = float("inf")
    update_fisher_(plain, bad, beta=0.9)
    for x, y in zip(plain, before):
        assert torch.equal(x, y)


@pytest.mark.parametrize("foreach", [True, False])
def test_sphere_noise_radius(foreach):
    params = _params()
    w = [p.clone() for p in params]
    backups = [p.clone() for p in params]
    sphere_noise_(params, backups, radius=0.3, generator=torch.Generator().manual_seed(0), foreach=foreach)
    dist = torch.sqrt(sum(((p - o) ** 2).sum() for p, o in zip(params, w)))
    torch.testing.assert_close(dist, torch.tensor(0.3, dtype=torch.float64))
