"""HessianOperator against the dense float64 Hessian: products, symmetry, batch weights, BatchNorm, backends."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn

from flatness.curvature import BACKENDS, HessianOperator, MatrixOperator, as_operator, dense_hessian
from tests.flatness.curvature.problems import LOSS, MODELS, make_batches, make_model, problem, reference_hessian


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", MODELS)
def test_products_match_dense_hessian(name: str) -> None:
    p = problem(name)
    H = HessianOperator(p.model, LOSS, p.batches, dtype=torch.float64)
    V = torch.randn(H.shape[0], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert H.shape == p.dense.shape
    assert _rel(H @ V, p.dense @ V) < 1e-12
    assert _rel(H @ V[:, 0], p.dense @ V[:, 0]) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_matches_dense(backend: str) -> None:
    p = problem("cnn1d_bn")
    H = HessianOperator(p.model, LOSS, p.batches, dtype=torch.float64, backend=backend)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert _rel(H @ v, p.dense @ v) < 1e-12
    assert _rel(H @ v, p.dense @ v) < 1e-12  # second product reuses whatever the backend cached


def test_symmetric_and_linear() -> None:
    p = problem("cnn1d_bn")
    H = HessianOperator(p.model, LOSS, p.batches, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    u, v = torch.randn(2, H.shape[0], dtype=torch.float64, generator=g)
    Hu, Hv = H @ u, H @ v
    assert abs(torch.dot(u, Hv) - torch.dot(v, Hu)) <= 1e-12 * Hu.norm() * v.norm()
    a, b = 2.5, -0.75
    assert _rel(H @ (a * u + b * v), a * Hu + b * Hv) < 1e-12
    assert (H.T @ u).equal(H @ u)


def test_batches_are_weighted_exactly() -> None:
    """Three uneven batches give the Hessian of the mean loss over all samples at once."""
    model = make_model("mlp")
    batches = make_batches()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    full = reference_hessian(model, LOSS, [(x, y)])
    H = HessianOperator(model, LOSS, batches, dtype=torch.float64)
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    columns = H @ eye[:, :50]
    assert _rel(columns, full[:, :50]) < 1e-12
    # the plain average of per-batch Hessians is a different matrix
    unweighted = sum(reference_hessian(model, LOSS, [b]) for b in batches) / len(batches)
    assert _rel(unweighted[:, :50], full[:, :50]) > 1e-3


def test_single_pair_is_one_batch() -> None:
    p = problem("mlp")
    x = torch.cat([b[0] for b in p.batches])
    y = torch.cat([b[1] for b in p.batches])
    H = HessianOperator(p.model, LOSS, (x, y), dtype=torch.float64)
    v = torch.ones(H.shape[0], dtype=torch.float64)
    assert _rel(H @ v, p.dense @ v) < 1e-12


@pytest.mark.parametrize("budget, cached", [(None, 3), (0, 0)])
def test_graph_cache_budget(budget: int | None, cached: int) -> None:
    p = problem("cnn1d")
    H = HessianOperator(p.model, LOSS, p.batches, dtype=torch.float64, graph_memory=budget)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert _rel(H @ v, p.dense @ v) < 1e-12
    assert H.cached_batches == cached


def test_graph_cache_partial() -> None:
    """A budget for about one batch caches some batches and recomputes the rest; same products."""
    p = problem("cnn1d")
    probe = HessianOperator(p.model, LOSS, p.batches, dtype=torch.float64)
    per_sample = probe._graph_bytes(probe._batches[0]) / len(p.batches[0][1])
    H = HessianOperator(p.model, LOSS, p.batches, dtype=torch.float64, graph_memory=int(per_sample * 50))
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert _rel(H @ v, p.dense @ v) < 1e-12
    assert 0 < H.cached_batches < 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_works_under_no_grad(backend: str) -> None:
    """Callers often hold torch.no_grad() (evaluation code); the operator still differentiates."""
    p = problem("mlp")
    H = HessianOperator(p.model, LOSS, p.batches, dtype=torch.float64, backend=backend)
    v = torch.ones(H.shape[0], dtype=torch.float64)
    with torch.no_grad():
        hv = H @ v
        _, grad = H.loss_and_gradient()
    assert _rel(hv, p.dense @ v) < 1e-12 and grad.norm() > 0


def test_float32_products() -> None:
    p = problem("cnn1d_bn")
    H = HessianOperator(p.model, LOSS, p.batches)
    assert H.dtype == torch.float32
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    hv = H @ v
    assert hv.dtype == torch.float32
    assert _rel(hv.double(), p.dense @ v) < 1e-5


def test_parameter_subset_is_a_diagonal_block() -> None:
    p = problem("mlp")
    model = p.model
    names = [k for k, _ in model.named_parameters()]
    last = names[-2:]  # classifier weight and bias
    start = sum(q.numel() for k, q in model.named_parameters() if k not in last)
    block = p.dense[start:, start:]
    by_name = HessianOperator(model, LOSS, p.batches, last, dtype=torch.float64)
    by_object = HessianOperator(model, LOSS, p.batches, [dict(model.named_parameters())[k] for k in reversed(last)], dtype=torch.float64)
    eye = torch.eye(block.shape[0], dtype=torch.float64)
    assert by_name.shape == block.shape and by_name.names == last and by_object.names == last
    assert _rel(by_name @ eye, block) < 1e-12
    assert _rel(by_object @ eye, block) < 1e-12
    assert _rel(dense_hessian(model, LOSS, p.batches, last), block) < 1e-12


def test_batchnorm_eval_mode_and_model_untouched() -> None:
    model = make_model("cnn1d_bn")
    model.train()
    state = copy.deepcopy(model.state_dict())
    batches = make_batches()
    H = HessianOperator(model, LOSS, batches, dtype=torch.float64)
    H @ torch.ones(H.shape[0], dtype=torch.float64)
    assert H.bn_mode == "eval"
    assert all(m.training for m in model.modules())  # flags restored
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # running stats and weights as they were
    assert all(q.grad is None for q in model.parameters())
    ref = reference_hessian(model, LOSS, batches)  # eval-mode reference (independent)
    v = torch.ones(H.shape[0], dtype=torch.float64)
    assert _rel(H @ v, ref @ v) < 1e-12
    assert HessianOperator(make_model("mlp"), LOSS, batches).bn_mode == "none"


def test_operator_is_a_snapshot() -> None:
    """Changing the model after construction does not change the operator (it holds its own copy)."""
    model = make_model("mlp")
    batches = make_batches()
    H = HessianOperator(model, LOSS, batches, dtype=torch.float64)
    v = torch.ones(H.shape[0], dtype=torch.float64)
    before = H @ v
    with torch.no_grad():
        for q in model.parameters():
            q.add_(1.0)
    assert torch.equal(H @ v, before)


def test_to_scipy_and_counts() -> None:
    p = problem("cnn1d")
    H = HessianOperator(p.model, LOSS, p.batches, dtype=torch.float64)
    S = H.to_scipy()
    x = np.random.default_rng(0).standard_normal(H.shape[0])
    assert S.shape == H.shape and S.dtype == np.float64
    np.testing.assert_allclose(S @ x, (p.dense @ torch.from_numpy(x)).numpy(), rtol=1e-10, atol=1e-14)
    assert H.hvp_count == 1
    H @ torch.zeros(H.shape[0], 3, dtype=torch.float64)
    assert H.hvp_count == 4


def test_loss_and_gradient() -> None:
    p = problem("cnn1d_bn")
    H = HessianOperator(p.model, LOSS, p.batches, dtype=torch.float64)
    loss, grad = H.loss_and_gradient()
    model = copy.deepcopy(p.model).double()
    x = torch.cat([b[0] for b in p.batches]).double()
    y = torch.cat([b[1] for b in p.batches])
    ref = LOSS(model(x), y)
    ref.backward()
    assert abs(float(loss) - float(ref.detach())) < 1e-12
    assert _rel(grad, torch.cat([q.grad.reshape(-1) for q in model.parameters()])) < 1e-12


def test_callback_sees_every_product() -> None:
    seen: list[int] = []
    p = problem("mlp")
    H = HessianOperator(p.model, LOSS, p.batches, callback=seen.append)
    H @ torch.ones(H.shape[0], 2)
    assert seen == [1, 2]


def test_dense_methods_agree() -> None:
    p = problem("cnn1d")
    assert _rel(dense_hessian(p.model, LOSS, p.batches, method="columns"), p.dense) < 1e-12


def test_matrix_operator() -> None:
    A = torch.randn(5, 5, dtype=torch.float64)
    op = as_operator(A)
    assert isinstance(op, MatrixOperator) and op.shape == (5, 5)
    assert torch.equal(op @ torch.ones(5, dtype=torch.float64), A @ torch.ones(5, dtype=torch.float64))
    assert as_operator(op) is op


ERRORS = [
    (lambda: HessianOperator(make_model("mlp"), LOSS, make_batches(), backend="hvp"), ValueError, "Unknown backend 'hvp'; expected one of 'graph'"),
    (lambda: HessianOperator(make_model("mlp"), LOSS, make_batches(), dtype=torch.float16), ValueError, "Unknown dtype torch.float16"),
    (lambda: HessianOperator(make_model("mlp"), LOSS, []), ValueError, "at least one batch"),
    (lambda: HessianOperator(make_model("mlp"), LOSS, make_batches(), ["net.9.weight"]), ValueError, "Parameter 'net.9.weight' is not in the model"),
    (lambda: HessianOperator(make_model("mlp"), LOSS, make_batches(), [nn.Parameter(torch.zeros(3))]), ValueError, r"shape \(3,\) is not in the model"),
    (lambda: HessianOperator(make_model("mlp"), LOSS, make_batches(), []), ValueError, "at least one parameter"),
    (lambda: HessianOperator(make_model("mlp"), LOSS, [torch.zeros(3)]), TypeError, "Expected batches of \\(inputs, targets\\)"),
    (lambda: HessianOperator(make_model("mlp"), LOSS, make_batches()) @ torch.zeros(3), ValueError, r"Expected a vector \(826,\) or matrix \(826, m\), got shape \(3,\)"),
    (lambda: HessianOperator(make_model("mlp"), LOSS, make_batches()) @ np.zeros(826), TypeError, "expects a torch.Tensor, got ndarray"),
    (lambda: HessianOperator(make_model("mlp"), LOSS, make_batches(), distributed=True), ValueError, "needs an initialized torch.distributed process group"),
    (lambda: as_operator([[1.0]]), TypeError, "Expected a torch.Tensor or an operator"),
    (lambda: as_operator(torch.zeros(2, 3)), ValueError, r"Expected a square matrix, got shape \(2, 3\)"),
    (lambda: dense_hessian(make_model("mlp"), LOSS, make_batches(), method="exact"), ValueError, "Unknown method 'exact'"),
]


@pytest.mark.parametrize("call, error, message", ERRORS, ids=[re.sub(r"\W+", "_", m)[:40] for _, _, m in ERRORS])
def test_errors(call, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("backend", ["graph", "backward"])
@pytest.mark.parametrize("name", MODELS)
def test_batched_matmat(name: str, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A block ``H @ V`` is ONE batched double backward (issue 22): equal to b single products and to the dense Hessian."""
    p = problem(name)
    seen: list[int] = []
    H = HessianOperator(p.model, LOSS, p.batches, dtype=torch.float64, backend=backend, batched=True, callback=seen.append)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    single = torch.stack([H @ V[:, j] for j in range(3)], dim=1)
    monkeypatch.setattr(HessianOperator, "_matvec", lambda self, v: pytest.fail("a block fell back to single products"))
    HV = H @ V
    assert H.hvp_count == 6 and seen == [1, 2, 3, 4, 5, 6]  # a block of b products counts b
    assert _rel(HV, single) < 1e-12 and _rel(HV, p.dense @ V) < 1e-12


def test_batched_matmat_with_a_partial_graph_cache() -> None:
    """Cached batches and recomputed ones in the same batched product."""
    p = problem("cnn1d")
    probe = HessianOperator(p.model, LOSS, p.batches, dtype=torch.float64)
    per_sample = probe._graph_bytes(probe._batches[0]) / len(p.batches[0][1])
    H = HessianOperator(p.model, LOSS, p.batches, dtype=torch.float64, graph_memory=int(per_sample * 50), batched=True)
    V = torch.randn(H.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert _rel(H @ V, p.dense @ V) < 1e-12 and 0 < H.cached_batches < 3
    assert not HessianOperator(p.model, LOSS, p.batches).batched  # CPU default: one product after the other
