"""Your own model, data and loss with flatness: a CNN on images and a transformer block on tokens.

Everything here is plain PyTorch (no torchvision, no downloads). The same
functions work from the command line and from Python.

Command line (from the repository root; each ``--model`` / ``--data`` /
``--loss`` names ``file.py:function``, and the checkpoint records them, so
``hessian``, ``surface`` and ``compare`` rebuild everything from the run)::

    python -m flatness train --model examples/own_model.py:cnn --data examples/own_model.py:images \\
        --method m-arwp --epochs 5 --out runs/own-cnn
    python -m flatness hessian runs/own-cnn --top-k 3 --out own-cnn.json
    python -m flatness surface runs/own-cnn --dim 1 --x=-1:1:21 --out own-cnn.h5

    python -m flatness train --model examples/own_model.py:transformer --data examples/own_model.py:tokens \\
        --loss examples/own_model.py:lm_loss --epochs 5 --out runs/own-lm
    python -m flatness hessian runs/own-lm --top-k 3 --out own-lm.json

    # weights saved by your own script (a plain state_dict): say what they are
    python -m flatness hessian cnn_weights.pt --model examples/own_model.py:cnn --data examples/own_model.py:images \\
        --out cnn.json

Python (``python examples/own_model.py``): trains both models a few steps with
``flatness.optim.MARWP`` and prints their top Hessian eigenvalues; the
transformer's loss is a :class:`flatness.losses.ModelLoss`, i.e. a function
of ``(model, batch)``.

The four hooks:

* ``cnn(channels=8)`` / ``transformer(vocab=16, dim=32, heads=4)``: return an
  ``nn.Module``; keyword arguments come from ``--model-kwargs '{"channels": 4}'``.
* ``images()`` / ``tokens()``: return ``(train, test)`` torch datasets (or
  DataLoaders, or ``(x, y)`` tensors). Batches keep the structure of the
  samples: ``(x, y)`` pairs for ``images``, 1-tuples ``(tokens,)`` for ``tokens``.
* ``lm_loss(model, batch)``: the mean next-token cross-entropy of a batch.
  ``(x, y)`` data need no loss hook: ``cross_entropy`` is the default,
  ``--loss mse`` the other built-in.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset


# ---------------------------------------------------------------- a CNN on synthetic images
class SmallCNN(nn.Module):
    """Two 3x3 convolutions with BatchNorm, global average pooling, a linear classifier."""

    def __init__(self, channels: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def cnn(channels: int = 8) -> nn.Module:
    """``--model examples/own_model.py:cnn``."""
    return SmallCNN(channels)


def images(n_train: int = 512, n_test: int = 256, size: int = 12) -> tuple[TensorDataset, TensorDataset]:
    """``--data examples/own_model.py:images``: 1x12x12 noisy bars, 4 classes (horizontal, vertical, two diagonals)."""
    g = torch.Generator().manual_seed(0)
    i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    patterns = torch.stack([(i % 4 == 0), (j % 4 == 0), ((i + j) % 4 == 0), ((i - j) % 4 == 0)]).float()

    def make(n: int) -> TensorDataset:
        y = torch.arange(n) % 4
        x = patterns[y] + 0.8 * torch.randn(n, size, size, generator=g)
        return TensorDataset(x.unsqueeze(1), y)

    return make(n_train), make(n_test)


# ---------------------------------------------------------------- a transformer block on tokens
class TinyLM(nn.Module):
    """Token + position embedding, one pre-norm transformer block (causal self-attention, MLP), tied output.

    The output layer reuses the token embedding (tied weights): the Hessian
    counts the shared matrix once.
    """

    def __init__(self, vocab: int = 16, dim: int = 32, heads: int = 4, length: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embed.weight, std=dim**-0.5)  # tied: keeps the initial logits O(1)
        self.pos = nn.Parameter(0.02 * torch.randn(length, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.register_buffer("mask", torch.triu(torch.ones(length, length, dtype=torch.bool), 1), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:t]
        a = self.norm1(h)
        h = h + self.attn(a, a, a, attn_mask=self.mask[:t, :t], need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return h @ self.embed.weight.T  # tied output layer: logits over the vocabulary


def transformer(vocab: int = 16, dim: int = 32, heads: int = 4) -> nn.Module:
    """``--model examples/own_model.py:transformer``."""
    return TinyLM(vocab, dim, heads)


def tokens(n_train: int = 256, n_test: int = 64, vocab: int = 16, length: int = 16) -> tuple[TensorDataset, TensorDataset]:
    """``--data examples/own_model.py:tokens``: sequences that repeat a random 4-token motif, so the next token is predictable."""
    g = torch.Generator().manual_seed(0)

    def make(n: int) -> TensorDataset:
        motif = torch.randint(0, vocab, (n, 4), generator=g)
        return TensorDataset(motif.repeat(1, length // 4))  # samples are 1-tuples (tokens,)

    return make(n_train), make(n_test)


def lm_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """``--loss examples/own_model.py:lm_loss``: mean next-token cross-entropy of a batch ``(tokens,)``."""
    (seq,) = batch
    logits = model(seq[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))


# ---------------------------------------------------------------- the same through the Python API
def _train(model: nn.Module, loss, batches: list, steps: int) -> None:  # noqa: ANN001 - either loss form
    from flatness.losses import batch_loss
    from flatness.optim import MARWP

    opt = MARWP(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, sigma=0.01, lam=0.5)
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]

        def closure(batch=batch) -> Tensor:
            loss_value = batch_loss(model, loss, batch)
            loss_value.backward()
            return loss_value

        opt.zero_grad()
        opt.step(closure)


def main(steps: int = 30) -> dict[str, list[float]]:
    """Train both models ``steps`` m-ARWP steps and return their top-3 Hessian eigenvalues."""
    from flatness.curvature import top_eigenvalues
    from flatness.data.user import read_split
    from flatness.evaluation import evaluate
    from flatness.losses import ModelLoss

    torch.manual_seed(0)
    results = {}
    cases = [("cnn", cnn(), images, nn.functional.cross_entropy), ("transformer", transformer(), tokens, ModelLoss(lm_loss, "lm_loss"))]
    for name, model, data, loss in cases:
        train, test = data()
        split = read_split(train, f"{name} data")  # the samples, in order, as tensors
        batches = [split.take(slice(i, i + 64)) for i in range(0, len(split), 64)]
        before = evaluate(model, loss, batches)[0]
        _train(model, loss, batches, steps)
        after, acc = evaluate(model, loss, batches)
        eig = top_eigenvalues(model, loss, batches, k=3)
        results[name] = eig.eigenvalues.tolist()
        shown = ", ".join(f"{v:.4g}" for v in results[name])
        print(f"{name}: loss {before:.3f} -> {after:.3f}" + (f" (accuracy {acc:.1f}%)" if acc == acc else "") + f"; top-3 eigenvalues {shown}")
    return results


if __name__ == "__main__":
    main()
