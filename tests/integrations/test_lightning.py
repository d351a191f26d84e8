"""FlatnessMixin under a real Lightning Trainer equals a plain ``opt.step(closure)`` loop.

Each case trains the same seeded network on the same batches twice: with
``lightning.Trainer`` (automatic optimization, the mixin) and with a plain
loop whose closure backpropagates ``loss_i / k`` over the window's
micro-batches. Weights must agree to 1e-6.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from flatness.optim import MARWP, RWP, SAM, StepOnUpdate
from tests.conftest import run_cli

L = pytest.importorskip("lightning.pytorch")
from flatness.integrations.lightning import CurvatureCallback, FlatnessMixin  # noqa: E402

BATCH = 8
NET_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.2), nn.Linear(12, 3))


    def data(n=320):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n, 6, generator=g)
        y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
        return torch.utils.data.TensorDataset(x, y), torch.utils.data.TensorDataset(x[:32], y[:32])
    """
)
_ns: dict = {}
exec(NET_SOURCE, _ns)
build, data = _ns["build"], _ns["data"]


def make_optimizer(method: str, net: nn.Module) -> torch.optim.Optimizer:
    common = {"lr": 0.2, "momentum": 0.9, "weight_decay": 1e-3}
    if method == "sam":
        return SAM(net.parameters(), torch.optim.SGD, rho=0.05, model=net, **common)
    if method == "rwp":
        return RWP(net.parameters(), torch.optim.SGD, sigma=0.02, model=net, seed=3, **common)
    mix = method.split("-")[1]  # marwp-same / marwp-alternate
    return MARWP(net.parameters(), torch.optim.SGD, sigma=0.05, lam=0.5, eta=0.1, beta=0.99, mix_batches=mix, model=net, seed=3, **common)


def make_scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.9**t)


def plain_loop(method: str, calls: int, k: int = 1, autocast: bool = False) -> dict[str, torch.Tensor]:
    net = build()
    opt = make_optimizer(method, net)
    sched = StepOnUpdate(make_scheduler(opt), opt)
    train, _ = data()
    batches = list(DataLoader(train, batch_size=BATCH))
    net.train()
    for c in range(calls):
        window = batches[c * k : (c + 1) * k]

        def closure(window=window) -> torch.Tensor:
            total = torch.zeros(())
            for x, y in window:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    loss = F.cross_entropy(net(x), y) / k
                loss.backward()
                total += loss.detach().float()
            return total

        opt.zero_grad(set_to_none=True)
        opt.step(closure)
        sched.step()
    return {n: t.detach().clone() for n, t in net.state_dict().items()}


class Lit(FlatnessMixin, L.LightningModule):
    def __init__(self, method: str) -> None:
        super().__init__()
        self.method = method
        self.net = build()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):  # noqa: ANN201
        opt = make_optimizer(self.method, self.net)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": make_scheduler(opt), "interval": "step"}}


def lightning_run(method: str, calls: int, k: int = 1, precision: str = "32-true", callbacks: list | None = None, logger=False) -> Lit:  # noqa: ANN001
    module = Lit(method)
    train, _ = data(calls * k * BATCH)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, accumulate_grad_batches=k, precision=precision, logger=logger,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, callbacks=callbacks or [],
    )
    trainer.fit(module, DataLoader(train, batch_size=BATCH))
    assert trainer.global_step == calls
    return module


def _assert_same(module: Lit, reference: dict[str, torch.Tensor]) -> None:
    got = module.net.state_dict()
    assert got.keys() == reference.keys()
    for name, want in reference.items():
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["sam", "marwp-same", "marwp-alternate"])
def test_twenty_steps_equal_the_plain_loop(method: str) -> None:
    """SAM, m-ARWP "same" and "alternate", a per-update LambdaLR stepped with interval="step"."""
    module = lightning_run(method, 20)
    _assert_same(module, plain_loop(method, 20))
    updates = 10 if method.endswith("alternate") else 20
    assert module.trainer.optimizers[0].num_updates == updates
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.2 * 0.9**updates)


@pytest.mark.parametrize("method", ["sam", "rwp", "marwp-alternate"])
def test_accumulation_equals_a_plain_accumulating_loop(method: str) -> None:
    """accumulate_grad_batches=2: every window's two micro-batches reach both passes."""
    module = lightning_run(method, 8, k=2)
    _assert_same(module, plain_loop(method, 8, k=2))


def test_bf16_mixed_precision_equals_the_plain_autocast_loop() -> None:
    module = lightning_run("sam", 6, precision="bf16-mixed")
    _assert_same(module, plain_loop("sam", 6, autocast=True))


def test_curvature_callback_matches_flatness_hessian(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """lambda_max after the last update (updates counted, not calls) equals ``flatness hessian`` on the saved weights."""
    (tmp_path / "mymod.py").write_text(NET_SOURCE)
    train, _ = data()
    fixed = train.tensors[0][:64], train.tensors[1][:64]
    callback = CurvatureCallback(fixed, every=5)
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path / "logs", name="run", version=0)
    module = lightning_run("marwp-alternate", 20, callbacks=[callback], logger=logger)  # 20 optimizer.step calls, 10 updates
    assert [r["step"] for r in callback.rows] == [5, 10]
    import csv

    with open(tmp_path / "logs" / "run" / "version_0" / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("curvature/lambda_max")]
    assert [int(r["step"]) for r in logged] == [5, 10]  # the trainer's logger, at step = updates
    assert [float(r["curvature/lambda_max"]) for r in logged] == pytest.approx([r["lambda_max"] for r in callback.rows], rel=1e-6)
    torch.save(module.net.state_dict(), tmp_path / "weights.pt")
    args = ["--model", "mymod.py:build", "--data", "mymod.py:data", "--samples", "64", "--top-k", "1", "--device", "cpu", "--quiet"]
    res = run_cli("hessian", "weights.pt", *args, "--out", "h.json", cwd=tmp_path, env=subprocess_env)
    assert res.returncode == 0, res.stderr
    want = json.loads((tmp_path / "h.json").read_text())["top_eigenvalues"][0]
    assert callback.rows[-1]["lambda_max"] == pytest.approx(want, rel=1e-4)
    assert module.training  # measured in eval mode, handed back in train mode


class LitScaled(Lit):
    """SAM that steps Lightning's GradScaler itself (``precision="16-mixed"``)."""

    def configure_optimizers(self):  # noqa: ANN201
        scaler = self.trainer.precision_plugin.scaler if self.method == "sam-scaled" else None
        return SAM(self.net.parameters(), torch.optim.SGD, rho=0.05, model=self.net, lr=0.2, momentum=0.9, grad_scaler=scaler)


def _fp16_trainer() -> "L.Trainer":
    """16-mixed with a GradScaler on CPU (Lightning gives CPU fp16 no scaler by default; CUDA has one)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    return L.Trainer(max_epochs=1, accelerator="cpu", devices=1, plugins=[plugin], logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False)


def test_fp16_with_the_trainers_grad_scaler_equals_the_plain_scaled_loop() -> None:
    module = LitScaled("sam-scaled")
    train, _ = data(6 * BATCH)
    trainer = _fp16_trainer()
    trainer.fit(module, DataLoader(train, batch_size=BATCH))
    net = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, model=net, lr=0.2, momentum=0.9, grad_scaler=scaler)
    net.train()
    for x, y in DataLoader(train, batch_size=BATCH):

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(net(x), y)
            scaler.scale(loss).backward()
            return loss

        opt.zero_grad(set_to_none=True)
        opt.step(closure)
    assert trainer.optimizers[0].num_updates == 6
    assert trainer.precision_plugin.scaler.get_scale() == scaler.get_scale()
    _assert_same(module, {n: t.detach() for n, t in net.state_dict().items()})


def test_fp16_without_the_grad_scaler_is_refused() -> None:
    train, _ = data(2 * BATCH)
    with pytest.raises(ValueError, match=r"build SAM with grad_scaler=self.trainer.precision_plugin.scaler"):
        _fp16_trainer().fit(LitScaled("sam"), DataLoader(train, batch_size=BATCH))
