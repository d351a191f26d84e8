"""Every HVP backend on a zoo of layers, against an independent dense float64 Hessian.

The reference (``problems.reference_hessian``) is an explicit double-backward
loop on the real module (one ``autograd.grad`` per row), with the attention
written out by hand
(softmax(QK^T / sqrt(d)) V), so it shares no code with the operator:
no ``functional_call``, no SDPA kernel, no batch weighting helper.

Zoo: a tiny MLP; a CNN with BatchNorm (eval mode: running statistics); an
attention block with tied input/output embeddings, LayerNorm and dropout
(eval mode: off) on token data with a ``ModelLoss`` and dict batches; a
model with an unused parameter (zero rows) and a frozen one (excluded).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flatness.curvature import BACKENDS, HessianOperator, lanczos_top_eigs
from flatness.losses import ModelLoss
from tests.flatness.curvature.problems import reference_hessian


class TinyAttention(nn.Module):
    """Embedding -> two-head self-attention (4-D SDPA) -> LayerNorm -> logits through the tied embedding."""

    def __init__(self, vocab: int = 7, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight  # tied
        self.explicit = False  # the reference writes attention out by hand

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        b, s, d = h.shape
        q, k, v = (t.reshape(b, s, 2, d // 2).transpose(1, 2) for t in self.qkv(h).chunk(3, dim=-1))
        if self.explicit:
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            a = torch.softmax(scores, dim=-1) @ v
        else:  # 4-D inputs: on CPU this picks the fused flash kernel, which has no double backward
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        a = a.transpose(1, 2).reshape(b, s, d)
        return self.out(self.norm(self.drop(a) + h))


def next_token_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    logits = model(batch["tokens"])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1))


class WithUnusedAndFrozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.b = nn.Linear(4, 3)
        self.unused = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.frozen(torch.tanh(self.a(x)))))


def _mlp() -> tuple[nn.Module, Any, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (7, 12)]
    return model, F.cross_entropy, batches


def _cnn_bn() -> tuple[nn.Module, Any, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6, 3))
    with torch.no_grad():
        model[1].running_mean.normal_(0, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(n, 1, 8, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (9, 5)]
    return model, F.cross_entropy, batches


def _attention() -> tuple[nn.Module, Any, list]:
    torch.manual_seed(0)
    model = TinyAttention()
    g = torch.Generator().manual_seed(3)
    batches = []
    for n in (3, 5):
        tokens = torch.randint(0, 7, (n, 4), generator=g)
        batches.append({"tokens": tokens, "targets": torch.roll(tokens, -1, dims=1)})
    return model, ModelLoss(next_token_loss, "test:next_token_loss"), batches


def _unused() -> tuple[nn.Module, Any, list]:
    torch.manual_seed(0)
    model = WithUnusedAndFrozen()
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (6, 10)]
    return model, F.cross_entropy, batches


ZOO: dict[str, Callable[[], tuple[nn.Module, Any, list]]] = {"mlp": _mlp, "cnn_bn": _cnn_bn, "attention": _attention, "unused": _unused}


def _reference(model: nn.Module, loss_fn: Any, batches: list) -> Tensor:
    """The independent dense Hessian, with attention written out by hand."""
    if isinstance(model, TinyAttention):
        model = copy.deepcopy(model)
        model.explicit = True
    return reference_hessian(model, loss_fn, batches)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_matches_independent_dense_hessian(name: str, backend: str) -> None:
    model, loss_fn, batches = ZOO[name]()
    model.train()  # the operator must switch to eval mode itself (dropout off, BN running stats)
    dense = _reference(model, loss_fn, batches)
    H = HessianOperator(model, loss_fn, batches, dtype=torch.float64, backend=backend)
    assert H.shape == dense.shape  # tied weights once, frozen excluded, unused included
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(H @ v, dense @ v, rtol=1e-9, atol=1e-11)
    top = lanczos_top_eigs(H, k=5, tol=1e-10)
    true = torch.linalg.eigvalsh(dense).flip(0)[:5]
    assert top.converged
    assert float(((top.eigenvalues - true).abs() / true.abs()).max()) <= 1e-6
    assert model.training  # the caller's mode is restored


def test_unused_parameter_has_zero_rows_and_frozen_is_excluded() -> None:
    model, loss_fn, batches = _unused()
    H = HessianOperator(model, loss_fn, batches, dtype=torch.float64)
    assert "frozen.weight" not in H.names and "unused" in H.names
    i = H.names.index("unused")
    start = sum(H.numels[:i])
    e = torch.zeros(H.shape[0], dtype=torch.float64)
    e[start] = 1.0
    assert torch.equal(H @ e, torch.zeros_like(e))
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal((H @ v)[start : start + H.numels[i]], torch.zeros(H.numels[i], dtype=torch.float64))


def test_sdpa_settings_are_restored_and_one_dict_batch_works() -> None:
    """The math-kernel switch is scoped to loss evaluation; a single dict batch is one batch."""
    model, loss_fn, batches = _attention()
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    H = HessianOperator(model, loss_fn, batches[0], dtype=torch.float64)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dense = _reference(model, loss_fn, batches[:1])
    assert torch.allclose(H @ v, dense @ v, rtol=1e-9, atol=1e-11)
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == flags
    q = torch.randn(2, 2, 4, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match="flash_attention"):  # outside the operator the fused kernel is back
        g, = torch.autograd.grad(F.scaled_dot_product_attention(q, q, q).sum(), q, create_graph=True)
        torch.autograd.grad(g.sum(), q)
