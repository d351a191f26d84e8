"""FlatnessTrainer (a real transformers.Trainer) on a tiny GPT-2 equals a plain ``opt.step(closure)`` loop.

The GPT-2 is built from a config (no download). Both sides start from the
same weights, read the same windows of micro-batches in order and use the
model's own loss with the Trainer's ``num_items_in_batch`` (the token count of
the window), so one update of either side sees the same gradient.
"""

from __future__ import annotations

import copy
import json
import textwrap
from pathlib import Path

import pytest
import torch

from flatness.optim import MARWP, SAM, StepOnUpdate
from tests.conftest import run_cli

transformers = pytest.importorskip("transformers")
from flatness.integrations.hf import CurvatureCallback, FlatnessTrainer  # noqa: E402

BATCH, LENGTH, VOCAB = 4, 8, 16


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2, n_inner=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def sequences(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    motif = torch.randint(0, VOCAB, (n, 4), generator=g)
    return motif.repeat(1, LENGTH // 4)


def labels_of(tokens: torch.Tensor) -> torch.Tensor:
    """The tokens as labels, position 0 ignored: every count of "items" agrees (shifted or not)."""
    labels = tokens.clone()
    labels[..., 0] = -100
    return labels


def make_optimizer(method: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if method == "sam":
        return SAM(model.parameters(), torch.optim.SGD, lr=0.5, momentum=0.9, rho=0.05, model=model)
    return MARWP(model.parameters(), torch.optim.SGD, lr=0.5, momentum=0.9, sigma=0.05, lam=0.5,
                 mix_batches=method.split("-")[1], model=model, seed=4)


def plain_loop(method: str, windows: int, k: int, bf16: bool = False) -> dict[str, torch.Tensor]:
    model = tiny_gpt2()
    opt = make_optimizer(method, model)
    sched = StepOnUpdate(transformers.get_linear_schedule_with_warmup(opt, 0, windows), opt)
    data = sequences(windows * k * BATCH)
    model.train()
    for w in range(windows):
        window = [data[(w * k + i) * BATCH : (w * k + i + 1) * BATCH] for i in range(k)]
        tokens = sum(int(labels_of(b).ne(-100).sum()) for b in window)  # the Trainer's num_items_in_batch

        def closure(window=window, tokens=tokens) -> torch.Tensor:
            total = torch.zeros(())
            for b in window:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(input_ids=b, labels=labels_of(b), num_items_in_batch=torch.tensor(tokens)).loss
                loss.backward()
                total += loss.detach()
            return total

        opt.zero_grad(set_to_none=True)
        opt.step(closure)
        sched.step()
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def trainer_run(method: str, windows: int, k: int, tmp_path: Path, callbacks: list | None = None, bf16: bool = False) -> FlatnessTrainer:
    model = tiny_gpt2()
    data = [{"input_ids": s, "labels": labels_of(s)} for s in sequences(windows * k * BATCH)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=k,
        max_steps=windows, lr_scheduler_type="linear", warmup_steps=0, train_sampling_strategy="sequential",
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, bf16=bf16,
    )
    trainer = FlatnessTrainer(model=model, args=args, train_dataset=data, optimizers=(make_optimizer(method, model), None),
                              callbacks=callbacks)
    trainer.train()
    return trainer


def _assert_same(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    for name, want in reference.items():
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(("method", "k"), [("sam", 1), ("marwp-same", 2), ("marwp-alternate", 2)])
def test_trainer_equals_the_plain_loop(method: str, k: int, tmp_path: Path) -> None:
    trainer = trainer_run(method, 6, k, tmp_path)
    _assert_same(trainer.model, plain_loop(method, 6, k))
    raw = trainer.flatness_optimizer
    assert raw.num_updates == (3 if method.endswith("alternate") else 6)


def test_bf16_autocast_equals_the_plain_autocast_loop(tmp_path: Path) -> None:
    """``bf16=True``: every pass of both sweeps runs under the Trainer's autocast."""
    trainer = trainer_run("marwp-same", 4, 2, tmp_path, bf16=True)
    _assert_same(trainer.model, plain_loop("marwp-same", 4, 2, bf16=True))


def test_curvature_callback_matches_flatness_hessian(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """The callback's lambda_max after the last update equals ``flatness hessian`` on the saved weights."""
    fixed = sequences(16)
    callback = CurvatureCallback({"input_ids": fixed, "labels": fixed}, every=2)
    trainer = trainer_run("marwp-alternate", 8, 1, tmp_path, callbacks=[callback])  # 8 windows, 4 updates
    assert [r["step"] for r in callback.rows] == [2, 4]
    logged = [e for e in trainer.state.log_history if "curvature/lambda_max" in e]
    assert [e["update"] for e in logged] == [2, 4]
    assert all("loss" in e and "learning_rate" in e for e in logged)  # joined the Trainer's own log at that step
    torch.save(copy.deepcopy(trainer.model.state_dict()), tmp_path / "weights.pt")
    (tmp_path / "lm.py").write_text(textwrap.dedent(
        f"""
        import torch, transformers

        def build():
            config = transformers.GPT2Config(vocab_size={VOCAB}, n_positions={LENGTH}, n_embd=16, n_layer=1, n_head=2, n_inner=32)
            return transformers.GPT2LMHeadModel(config)

        def data():
            g = torch.Generator().manual_seed(2)
            x = torch.randint(0, {VOCAB}, (16, 4), generator=g).repeat(1, {LENGTH // 4})
            ds = torch.utils.data.TensorDataset(x)
            return ds, ds

        def loss(model, batch):
            (x,) = batch
            return model(input_ids=x, labels=x).loss
        """
    ))
    args = ["--model", "lm.py:build", "--data", "lm.py:data", "--loss", "lm.py:loss", "--top-k", "1", "--device", "cpu", "--quiet"]
    res = run_cli("hessian", "weights.pt", *args, "--out", "h.json", cwd=tmp_path, env=subprocess_env)
    assert res.returncode == 0, res.stderr
    want = json.loads((tmp_path / "h.json").read_text())["top_eigenvalues"][0]
    assert callback.rows[-1]["lambda_max"] == pytest.approx(want, rel=1e-4)


def test_curvature_reaches_report_to_tensorboard_and_a_plain_trainer(tmp_path: Path) -> None:
    """Under FlatnessTrainer the rows reach ``report_to`` (TensorBoard here); under a plain Trainer, the log history."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    fixed = sequences(16)
    callback = CurvatureCallback({"input_ids": fixed, "labels": labels_of(fixed)}, every=2)
    model = tiny_gpt2()
    data = [{"input_ids": s, "labels": labels_of(s)} for s in sequences(4 * BATCH)]
    tb = tmp_path / "hf"  # the Trainer's TensorBoard events go under output_dir/runs/
    args = transformers.TrainingArguments(
        output_dir=str(tb), per_device_train_batch_size=BATCH, max_steps=4, report_to=["tensorboard"],
        save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    FlatnessTrainer(model=model, args=args, train_dataset=data, optimizers=(make_optimizer("sam", model), None), callbacks=[callback]).train()
    files = list(tb.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {tb}"
    acc = event_accumulator.EventAccumulator(str(files[0].parent))
    acc.Reload()
    scalars = acc.Scalars("train/curvature/lambda_max")
    assert [e.step for e in scalars] == [2, 4]
    assert [e.value for e in scalars] == pytest.approx([r["lambda_max"] for r in callback.rows], rel=1e-6)

    plain = CurvatureCallback({"input_ids": fixed, "labels": labels_of(fixed)}, every=2)
    model = tiny_gpt2()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "plain"), per_device_train_batch_size=BATCH, max_steps=4, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None), callbacks=[plain])
    trainer.train()
    assert [e["update"] for e in trainer.state.log_history if "curvature/lambda_max" in e] == [2, 4]
