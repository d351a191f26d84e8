"""flatness.analysis.prepare_analysis: checkpoint or run directory, the user's model / data / loss, fit checks."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from flatness.analysis import Sources, prepare_analysis
from flatness.checkpoint import resolve_checkpoint_path, save_checkpoint
from flatness.errors import FlatnessError
from flatness.losses import ModelLoss

USER = textwrap.dedent(
    """
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    IDS = torch.randint(0, 7, (24, 5), generator=g)


    class Bag(nn.Module):
        def __init__(self, vocab=7, dim=4):
            super().__init__()
            self.embed = nn.EmbeddingBag(vocab, dim)
            self.out = nn.Linear(dim, vocab)

        def forward(self, ids):
            return self.out(self.embed(ids))


    def data():
        rows = [{"ids": IDS[i], "target": IDS[i, 0]} for i in range(24)]
        return rows[:16], rows[16:]


    def loss(model, batch):  # predict the first token of each bag
        return nn.functional.cross_entropy(model(batch["ids"]), batch["target"])


    def wrong_key(model, batch):
        return model(batch["tokens"]).sum()


    def per_sample(model, batch):
        return nn.functional.cross_entropy(model(batch["ids"]), batch["target"], reduction="none")
    """
)


@pytest.fixture
def user_ckpt(tmp_path: Path) -> Path:
    """A flatness checkpoint of the user's model that records the user's data and loss, in a run directory."""
    module = tmp_path / "bag.py"
    module.write_text(USER)
    torch.manual_seed(0)
    from flatness.models import build_model

    net = build_model(f"{module}:Bag", dim=4)
    path = tmp_path / "run" / "final.pt"
    path.parent.mkdir()
    spec = {"model": f"{module}:Bag", "model_kwargs": {"dim": 4}, "dataset": f"{module}:data", "loss": f"{module}:loss"}
    save_checkpoint(path, {**spec, "config": {"data": spec["dataset"], "loss": spec["loss"]}, "state_dict": net.state_dict(), "metrics": []})
    return path


def test_user_model_data_and_loss_from_the_checkpoint(user_ckpt: Path) -> None:
    a = prepare_analysis(user_ckpt.parent, samples=12, batch_size=5)  # a run directory: its final.pt
    assert a.checkpoint.path == user_ckpt and a.run_dir == user_ckpt.parent
    assert isinstance(a.loss_fn, ModelLoss) and a.loss == a.loss_fn.name == f"{user_ckpt.parent.parent / 'bag.py'}:loss"
    assert [sorted(b) for b in a.batches] == [["ids", "target"]] * 3 and a.samples == 12
    assert [b["ids"].shape[0] for b in a.batches] == [5, 5, 2]
    # the loss it returns is the user's mean loss over the samples, batch-size weighted
    ids = torch.cat([b["ids"] for b in a.batches])
    want = nn.functional.cross_entropy(a.model(ids), ids[:, 0])
    got = sum(a.loss_fn(a.model, b) * b["ids"].shape[0] for b in a.batches) / 12
    torch.testing.assert_close(got, want)
    assert a.data is not None and len(a.data.test) == 8


def test_sources_override_and_misfits(user_ckpt: Path) -> None:
    module = user_ckpt.parent.parent / "bag.py"
    with pytest.raises(FlatnessError, match=r"loss '.*:wrong_key' fails on model .* with .* data: 'tokens'"):
        prepare_analysis(user_ckpt, sources=Sources(loss=f"{module}:wrong_key"))
    with pytest.raises(FlatnessError, match=r"must return a scalar tensor \(the mean over the batch\), got a tensor of shape \(2,\)"):
        prepare_analysis(user_ckpt, sources=Sources(loss=f"{module}:per_sample"))
    with pytest.raises(FlatnessError, match=r"yields batches of dicts with keys ids, target, not \(inputs, targets\) pairs: pass --loss"):
        prepare_analysis(user_ckpt, sources=Sources(loss="cross_entropy"))
    with pytest.raises(FlatnessError, match=r"was trained on '.*bag.py:data', but --data is 'synthetic'; pass --allow-other-data"):
        prepare_analysis(user_ckpt, sources=Sources(data="synthetic", loss="cross_entropy"))
    with pytest.raises(FlatnessError, match=r"does not fit synthetic data and loss 'cross_entropy'"):  # float inputs into an EmbeddingBag
        prepare_analysis(user_ckpt, sources=Sources(data="synthetic", loss="cross_entropy", allow_other_data=True))
    with pytest.raises(FlatnessError, match=r"was built with model kwargs \{'dim': 4\}, but --model-kwargs is \{'dim': 8\}"):
        prepare_analysis(user_ckpt, sources=Sources(model_kwargs={"dim": 8}))


def test_recorded_user_code_moved(user_ckpt: Path) -> None:
    module = user_ckpt.parent.parent / "bag.py"
    moved = module.with_name("moved_bag.py")
    module.rename(moved)
    with pytest.raises(FlatnessError, match=r"needs model '.*bag.py:Bag', which cannot be rebuilt \(no such file .*\); pass --model"):
        prepare_analysis(user_ckpt)
    with pytest.raises(FlatnessError, match=r"records data '.*bag.py:data', which cannot be loaded \(no such file .*\); pass --data"):
        prepare_analysis(user_ckpt, sources=Sources(model=f"{moved}:Bag"))
    with pytest.raises(FlatnessError, match=r"records loss '.*bag.py:loss', which cannot be loaded \(no such file .*\); pass --loss"):
        prepare_analysis(user_ckpt, sources=Sources(model=f"{moved}:Bag", data=f"{moved}:data"))
    a = prepare_analysis(user_ckpt, sources=Sources(model=f"{moved}:Bag", data=f"{moved}:data", loss=f"{moved}:loss"))
    assert a.checkpoint.model_name == f"{moved}:Bag"
    with pytest.raises(FlatnessError, match=r"holds model '.*:Bag', but --model is 'mlp'"):
        prepare_analysis(user_ckpt, sources=Sources(model="mlp"))


def test_plain_state_dict_of_a_user_model(tmp_path: Path) -> None:
    (tmp_path / "bag.py").write_text(USER)
    from flatness.models import build_model

    state = build_model(f"{tmp_path / 'bag.py'}:Bag", dim=3).state_dict()
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "w.pt")  # DataParallel prefix
    src = Sources(model=f"{tmp_path / 'bag.py'}:Bag", model_kwargs={"dim": 3}, data=f"{tmp_path / 'bag.py'}:data", loss=f"{tmp_path / 'bag.py'}:loss")
    a = prepare_analysis(tmp_path / "w.pt", split="test", sources=src)
    assert a.checkpoint.model_kwargs == {"dim": 3} and a.samples == 8  # no num_classes guessed for a user model


def test_run_directory_resolution(tmp_path: Path, make_checkpoint) -> None:  # noqa: ANN001
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(FlatnessError, match=r"run directory .*run has no final.pt or checkpoints/last.pt"):
        resolve_checkpoint_path(run)
    last = make_checkpoint(name="run/checkpoints/last.pt")
    assert resolve_checkpoint_path(run) == (last, run)  # an unfinished run
    final = make_checkpoint(name="run/final.pt", seed=1)
    assert resolve_checkpoint_path(run) == (final, run) and resolve_checkpoint_path(final) == (final, None)
    a = prepare_analysis(run, samples=10)
    assert a.checkpoint.path == final and a.loss == "cross_entropy" and a.batches[0][0].shape == (10, 40)
    assert prepare_analysis(run, samples=10, sources=Sources(data="synthetic")).dataset == "synthetic"  # its own data, named


def test_other_data_needs_the_flag(make_checkpoint) -> None:  # noqa: ANN001
    ckpt = make_checkpoint(data="mnist1d")
    with pytest.raises(FlatnessError, match=r"trained on 'mnist1d', but --data is 'synthetic'; pass --allow-other-data"):
        prepare_analysis(ckpt, sources=Sources(data="synthetic"))
    a = prepare_analysis(ckpt, samples=10, sources=Sources(data="synthetic", allow_other_data=True))
    assert a.dataset == "synthetic"
