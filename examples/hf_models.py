"""Hugging Face transformers models with flatness: a GPT-2 language model and a BERT classifier.

Both are built from a config (random weights, no download; set
``HF_HUB_OFFLINE=1`` to be sure nothing is fetched). ``pip install 'flatness[hf]'``.

Command line (``--model`` / ``--data`` / ``--loss`` name ``file.py:function``;
``--model-kwargs`` / ``--data-kwargs`` shrink or grow them)::

    python -m flatness train --model examples/hf_models.py:gpt2 --data examples/hf_models.py:tokens \\
        --loss examples/hf_models.py:lm_loss --method sam --epochs 3 --out runs/gpt2
    python -m flatness hessian runs/gpt2 --top-k 3 --samples 128 --out gpt2.json
    python -m flatness surface runs/gpt2 --dim 1 --x=-1:1:21 --samples 128 --out gpt2.h5

    python -m flatness train --model examples/hf_models.py:bert --data examples/hf_models.py:sentences \\
        --loss examples/hf_models.py:cls_loss --method m-arwp --epochs 3 --out runs/bert-marwp
    python -m flatness train ... --method sam --out runs/bert-sam          # the same with SAM
    python -m flatness compare runs/bert-marwp runs/bert-sam --samples 128 --out bert-report

    # weights saved by your own script (model.state_dict()):
    python -m flatness hessian gpt2_weights.pt --model examples/hf_models.py:gpt2 \\
        --data examples/hf_models.py:tokens --loss examples/hf_models.py:lm_loss --out gpt2.json

Python (``python examples/hf_models.py``): a few SAM steps on each model in a
plain loop, then the top Hessian eigenvalue through
:func:`flatness.curvature.top_eigenvalues`. Under ``transformers.Trainer`` use
:class:`flatness.integrations.hf.FlatnessTrainer` instead (README, "In your
training stack").

The losses are written out (cross-entropy on the logits) rather than taken
from ``model(..., labels=...).loss``: the built-in LM loss casts the logits
to float32, which would cap a float64 Hessian (``--dtype float64``) at float32
accuracy. The values are the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset


def gpt2(n_layer: int = 1, n_embd: int = 32, n_head: int = 2, vocab: int = 32, length: int = 16) -> nn.Module:
    """``--model examples/hf_models.py:gpt2``: a GPT-2 LM head model from ``GPT2Config`` (eager attention, no dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab, n_positions=length, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_inner=2 * n_embd,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager",  # plain matmuls: double backward and float64 work everywhere
    )
    return GPT2LMHeadModel(config)


def tokens(n_train: int = 256, n_test: int = 64, vocab: int = 32, length: int = 16) -> tuple[TensorDataset, TensorDataset]:
    """``--data examples/hf_models.py:tokens``: sequences repeating a random 4-token motif; samples are 1-tuples ``(tokens,)``."""
    g = torch.Generator().manual_seed(0)

    def make(n: int) -> TensorDataset:
        motif = torch.randint(0, vocab, (n, 4), generator=g)
        return TensorDataset(motif.repeat(1, length // 4))

    return make(n_train), make(n_test)


def lm_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """``--loss examples/hf_models.py:lm_loss``: mean next-token cross-entropy (GPT-2's LM loss, in the model's dtype)."""
    (seq,) = batch
    logits = model(input_ids=seq).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))


def bert(n_layer: int = 1, hidden: int = 32, heads: int = 2, vocab: int = 32, length: int = 16, classes: int = 2) -> nn.Module:
    """``--model examples/hf_models.py:bert``: ``BertForSequenceClassification`` from ``BertConfig`` (no dropout)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_layer, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=length, type_vocab_size=1, num_labels=classes,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )
    return BertForSequenceClassification(config)


def sentences(n_train: int = 256, n_test: int = 64, vocab: int = 32, length: int = 16) -> tuple[TensorDataset, TensorDataset]:
    """``--data examples/hf_models.py:sentences``: ``(tokens, label)``, label 1 when token 1 occurs in the sequence."""
    g = torch.Generator().manual_seed(0)

    def make(n: int) -> TensorDataset:
        x = torch.randint(2, vocab, (n, length), generator=g)
        y = torch.arange(n) % 2
        where = torch.randint(0, length, (n,), generator=g)
        x[y == 1, where[y == 1]] = 1
        return TensorDataset(x, y)

    return make(n_train), make(n_test)


def cls_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """``--loss examples/hf_models.py:cls_loss``: cross-entropy of the classifier's logits."""
    x, y = batch
    return F.cross_entropy(model(input_ids=x).logits, y)


def main(steps: int = 20) -> dict[str, float]:
    """SAM for ``steps`` steps on each model (plain loop), then lambda_max on 64 training samples."""
    from flatness.curvature import top_eigenvalues
    from flatness.losses import ModelLoss
    from flatness.optim import SAM

    torch.manual_seed(0)
    results = {}
    for name, build, data, loss in (("gpt2", gpt2, tokens, lm_loss), ("bert", bert, sentences, cls_loss)):
        model = build()
        train, _ = data()
        batches = [train[i : i + 32] for i in range(0, 256, 32)]
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.05, model=model)
        model.train()
        for step in range(steps):
            batch = batches[step % len(batches)]

            def closure(batch=batch) -> Tensor:
                value = loss(model, batch)
                value.backward()
                return value

            opt.zero_grad()
            opt.step(closure)
        eig = top_eigenvalues(model, ModelLoss(loss, name), [train[:64]], k=1)
        results[name] = float(eig.eigenvalues[0])
        print(f"{name}: lambda_max {results[name]:.4g} after {steps} SAM steps")
    return results


if __name__ == "__main__":
    main()
