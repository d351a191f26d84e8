"""Checkpoints: atomic writes, safe loading, foreign state_dicts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from flatness.checkpoint import load_checkpoint, save_checkpoint
from flatness.errors import FlatnessError
from flatness.models import build_model


class Payload:
    """An object whose unpickling would write a file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_round_trip(make_checkpoint) -> None:
    path = make_checkpoint("mlp", seed=3)
    ckpt = load_checkpoint(path)
    assert ckpt.model_name == "mlp" and not ckpt.model.training
    torch.manual_seed(3)
    ref = build_model("mlp", in_features=40, num_classes=10)
    for a, b in zip(ref.state_dict().values(), ckpt.model.state_dict().values()):
        assert torch.equal(a, b)


def test_pickle_payload_refused(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "flatness-checkpoint", "state_dict": {}, "x": Payload(target)}, path)
    with pytest.raises(FlatnessError, match="refused"):
        load_checkpoint(path)
    assert not target.exists()


def test_truncated_and_missing(make_checkpoint, tmp_path: Path) -> None:
    path = make_checkpoint("mlp")
    data = path.read_bytes()
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(FlatnessError, match="cannot be read"):
        load_checkpoint(bad)
    with pytest.raises(FlatnessError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_model_mismatch(make_checkpoint) -> None:
    with pytest.raises(FlatnessError, match="holds model 'mlp', but --model is 'cnn1d'"):
        load_checkpoint(make_checkpoint("mlp"), model="cnn1d")


@pytest.mark.parametrize("wrap", ["plain", "ddp", "nested"])
def test_foreign_state_dict(tmp_path: Path, wrap: str) -> None:
    torch.manual_seed(0)
    net = build_model("resnet18", num_classes=100, width=4)
    sd = net.state_dict()
    if wrap == "ddp":
        sd = {f"module.{k}": v for k, v in sd.items()}
    obj = {"state_dict": sd, "epoch": 200} if wrap == "nested" else sd
    path = tmp_path / "foreign.pt"
    torch.save(obj, path)
    with pytest.raises(FlatnessError, match="pass --model"):
        load_checkpoint(path)
    ckpt = load_checkpoint(path, model="resnet18", model_kwargs={"width": 4})
    assert ckpt.foreign and ckpt.model_kwargs["num_classes"] == 100
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    torch.testing.assert_close(ckpt.model(x), net(x))
    with pytest.raises(FlatnessError, match="does not fit model 'mlp'"):
        load_checkpoint(path, model="mlp")


def test_failed_write_keeps_previous(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": "mlp", "state_dict": {"a": torch.ones(2)}})
    before = path.read_bytes()
    with pytest.raises((TypeError, AttributeError)):
        save_checkpoint(path, {"model": "mlp", "state_dict": {"a": torch.ones(2)}, "bad": lambda: 0})  # unpicklable -> fails mid-write
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


def test_atomic_write_permissions_without_touching_the_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12: no process-wide side effects; the file gets the mode of any new file (0o666 & ~umask)."""
    import os

    from flatness.atomic import atomic_write_text

    def no_umask(*_args: object) -> int:
        raise AssertionError("atomic writes must not read or change the process umask")

    old_mask = os.umask(0o027)  # a distinctive umask for the test
    try:
        monkeypatch.setattr(os, "umask", no_umask)
        path = tmp_path / "f.json"
        atomic_write_text(path, "{}")
    finally:
        monkeypatch.undo()
        os.umask(old_mask)
    assert path.read_text() == "{}"
    assert (path.stat().st_mode & 0o777) == 0o640
    assert not list(tmp_path.glob("*.tmp"))


def test_process_group_is_destroyed_only_by_its_creator() -> None:
    """Issue 12: one owner for a process group; a group joined before is left alone."""
    import socket

    import torch.distributed as dist

    from flatness.distributed import process_group

    with process_group(torch.device("cpu")) as info:  # one process: no group at all
        assert not info.active and not dist.is_initialized()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        with process_group(torch.device("cpu")):
            pass
        assert dist.is_initialized()  # not ours to destroy
    finally:
        dist.destroy_process_group()
