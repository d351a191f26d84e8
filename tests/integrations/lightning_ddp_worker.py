"""Lightning DDP (2 CPU processes, gloo) with FlatnessMixin; rank 0 saves the final weights.

Run by tests/integrations/test_lightning_ddp.py as ``python lightning_ddp_worker.py METHOD K OUT``;
Lightning's launcher starts the second rank by running this script again.
"""

from __future__ import annotations

import sys

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from flatness.integrations.lightning import FlatnessMixin
from flatness.optim import MARWP, SAM

BATCH = 4  # per rank


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def dataset(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long())


def make_optimizer(method: str, net: nn.Module) -> torch.optim.Optimizer:
    if method == "sgd":  # the reference's own check: plain DDP equals the loop on the union
        return torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    if method == "sam":
        return SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.2, momentum=0.9)
    return MARWP(net.parameters(), torch.optim.SGD, sigma=0.05, lam=0.5, mix_batches="alternate", seed=3, lr=0.2, momentum=0.9)


class Lit(FlatnessMixin, L.LightningModule):
    def __init__(self, method: str, calls: int) -> None:
        super().__init__()
        self.method, self.calls = method, calls
        self.net = build()

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):  # noqa: ANN201
        return make_optimizer(self.method, self.net)

    def train_dataloader(self) -> DataLoader:
        """Rank r reads samples r, r + 2, r + 4, ... in order (no shuffling, unlike Lightning's own sampler)."""
        ds = dataset(self.calls * self.trainer.accumulate_grad_batches * BATCH * 2)
        sampler = DistributedSampler(ds, num_replicas=self.trainer.world_size, rank=self.global_rank, shuffle=False)
        return DataLoader(ds, batch_size=BATCH, sampler=sampler)


def main(method: str, k: int, out: str, calls: int) -> None:
    module = Lit(method, calls)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", accumulate_grad_batches=k, logger=False,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, use_distributed_sampler=False,
    )
    trainer.fit(module)
    if trainer.is_global_zero:
        torch.save({"state_dict": module.net.state_dict(), "global_step": trainer.global_step}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
