"""The CLI on the user's own model, data and loss (issue 15): nothing trained, a plain state_dict.

A temp dir holds ``mymod.py`` (a model class, a data callable, a loss) and the
weights of the model as a plain ``state_dict``; ``flatness hessian``,
``surface`` and ``compare`` run on it with ``--model mymod.py:build --data
mymod.py:data`` and are checked against a dense float64 Hessian and losses
built here, independently of the library (``torch.func.hessian``).
"""

from __future__ import annotations

import json
import runpy
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from flatness.checkpoint import save_checkpoint
from flatness.cli.main import main
from tests.conftest import REPO, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, width=6):
            super().__init__()
            self.fc1 = nn.Linear(5, width)
            self.fc2 = nn.Linear(width, 3)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))


    def build(width=6):
        return Net(width)


    def data(n_train=40):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(60, 5, generator=g)
        y = torch.randint(0, 3, (60,), generator=g)
        ds = torch.utils.data.TensorDataset
        # a shuffling loader: flatness must still read the samples in dataset order
        train = torch.utils.data.DataLoader(ds(x[:n_train], y[:n_train]), batch_size=16, shuffle=True)
        return train, ds(x[40:], y[40:])


    def loss(model, batch):
        x, y = batch
        return 0.5 * ((model(x) - nn.functional.one_hot(y, 3).float()) ** 2).sum(1).mean()
    """
)


def _user_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g)
    y = torch.randint(0, 3, (60,), generator=g)
    return x[:40].double(), y[:40]


def _reference_net(width: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3))


def _fitted_net() -> nn.Module:
    """Weights near a minimum (so random perturbations raise the loss): 200 full-batch Adam steps, in this process."""
    net = _reference_net()
    x, y = _user_data()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x.float()), y).backward()
        opt.step()
    return net


def _named(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The user's parameter names -> the reference Sequential's."""
    return {k.replace("fc1", "0").replace("fc2", "2"): v.double() for k, v in state.items()}


def _dense(state: dict[str, torch.Tensor], loss: str = "cross_entropy") -> tuple[float, torch.Tensor]:
    """Loss and dense Hessian over all parameters (model.parameters() order), float64, by torch.func.hessian."""
    net = _reference_net().double()
    params = _named(state)
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    x, y = _user_data()

    def f(flat: torch.Tensor) -> torch.Tensor:
        chunks = dict(zip(names, (c.view(s) for c, s in zip(flat.split(sizes), shapes))))
        out = functional_call(net, chunks, (x,))
        if loss == "cross_entropy":
            return nn.functional.cross_entropy(out, y)
        return 0.5 * ((out - nn.functional.one_hot(y, 3).double()) ** 2).sum(1).mean()

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    return float(f(flat)), torch.func.hessian(f)(flat)


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    (tmp_path / "mymod.py").write_text(USER_MODULE)
    net = _fitted_net()
    state = {k.replace("0.", "fc1.").replace("2.", "fc2."): v for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / "weights.pt")  # a plain state_dict, as another tool writes it
    return tmp_path


USER = ["--model", "mymod.py:build", "--data", "mymod.py:data"]


def test_hessian_of_own_model_matches_dense_reference(user_dir: Path) -> None:
    args = ["--top-k", "4", "--dtype", "float64", "--tol", "1e-10", "--device", "cpu", "--quiet", "--out", "h.json"]
    res = run_cli("hessian", "weights.pt", *USER, *args, cwd=user_dir, env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    result = json.loads((user_dir / "h.json").read_text())
    loss, H = _dense(torch.load(user_dir / "weights.pt"))
    ref = torch.linalg.eigvalsh(H).flip(0)[:4]
    assert result["samples"] == 40 and result["num_params"] == H.shape[0] == 57
    np.testing.assert_allclose(result["loss"], loss, rtol=1e-12)
    np.testing.assert_allclose(result["top_eigenvalues"], ref.numpy(), rtol=1e-8, atol=1e-10)


def test_hessian_with_own_loss_matches_dense_reference(user_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(user_dir)  # the entry function in this process, with paths relative to the user's folder
    args = ["--loss", "mymod.py:loss", "--top-k", "2", "--dtype", "float64", "--tol", "1e-10", "--quiet", "--out", "h.json"]
    assert main(["hessian", "weights.pt", *USER, *args]) == 0
    result = json.loads((user_dir / "h.json").read_text())
    loss, H = _dense(torch.load(user_dir / "weights.pt"), loss="squared")
    np.testing.assert_allclose(result["loss"], loss, rtol=1e-12)
    np.testing.assert_allclose(result["top_eigenvalues"], torch.linalg.eigvalsh(H).flip(0)[:2].numpy(), rtol=1e-8)


def test_surface_of_own_model(user_dir: Path) -> None:
    args = ["--dim", "1", "--x=-1:1:5", "--quiet", "--device", "cpu", "--out", "s.h5"]
    res = run_cli("surface", "weights.pt", *USER, *args, cwd=user_dir, env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    state = torch.load(user_dir / "weights.pt")
    with h5py.File(user_dir / "s.h5", "r") as f:
        xs, values = f["xcoordinates"][:], f["train_loss"][:]
        direction = [torch.from_numpy(f["xdirection"][str(k)][:]) for k in range(len(f["xdirection"]))]
    assert xs.tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    for i in (2, 4):  # the centre, and the end of the line: w + 1.0 * d
        moved = {k: v + xs[i] * d.view_as(v) for (k, v), d in zip(state.items(), direction)}
        np.testing.assert_allclose(values[i], _dense(moved)[0], rtol=1e-5)


def test_compare_own_models(user_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """compare takes a run directory as surface and hessian do: an unfinished run stands for checkpoints/last.pt."""
    torch.manual_seed(1)
    other = {k: v + 0.1 * torch.randn_like(v) for k, v in torch.load(user_dir / "weights.pt").items()}
    (user_dir / "run_b" / "checkpoints").mkdir(parents=True)
    torch.save(other, user_dir / "run_b" / "checkpoints" / "last.pt")
    args = ["--samples", "40", "--surface", "none", "--top-k", "2", "--radii", "0", "0.05", "--draws", "4", "--quiet", "--out", "rep"]
    res = run_cli("compare", "weights.pt", "run_b", *USER, *args, cwd=user_dir, env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    report = json.loads((user_dir / "rep" / "report.json").read_text())
    assert [Path(e["path"]).name for e in report["checkpoints"]] == ["weights.pt", "last.pt"]
    top = [_lambda_max(e) for e in report["checkpoints"]]
    states = (torch.load(user_dir / "weights.pt"), other)
    refs = [float(torch.linalg.eigvalsh(_dense(s)[1])[-1]) for s in states]
    np.testing.assert_allclose(top, refs, rtol=1e-4)
    np.testing.assert_allclose([e["train_loss"] for e in report["checkpoints"]], [_dense(s)[0] for s in states], rtol=1e-5)
    # another loss on the same files is measured again, not read from the report's cache
    monkeypatch.chdir(user_dir)
    assert main(["compare", "weights.pt", "run_b", *USER, "--loss", "mymod.py:loss", *args, "--force"]) == 0
    report = json.loads((user_dir / "rep" / "report.json").read_text())
    want = [_dense(s, loss="squared")[0] for s in states]
    np.testing.assert_allclose([e["train_loss"] for e in report["checkpoints"]], want, rtol=1e-5)


def _lambda_max(entry: dict) -> float:
    for key in ("lambda_max", "top_eigenvalues"):
        if key in entry:
            value = entry[key]
            return float(value[0] if isinstance(value, list) else value)
    raise KeyError(f"no lambda_max in {sorted(entry)}")


def test_checkpoint_records_user_code_and_refuses_when_it_is_gone(user_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(user_dir)
    state = torch.load(user_dir / "weights.pt")
    ckpt = user_dir / "run" / "final.pt"
    ckpt.parent.mkdir()
    spec = {"model": "mymod.py:build", "model_kwargs": {"width": 6}, "dataset": "mymod.py:data", "loss": "mymod.py:loss"}
    save_checkpoint(ckpt, {**spec, "config": {"data": spec["dataset"], "loss": spec["loss"]}, "state_dict": state, "metrics": []})
    # a run directory stands for its final.pt; model, data and loss come from the checkpoint
    assert main(["hessian", "run", "--top-k", "1", "--dtype", "float64", "--quiet", "--out", "h.json"]) == 0
    result = json.loads((user_dir / "h.json").read_text())
    assert result["loss_name"] == "mymod.py:loss"
    np.testing.assert_allclose(result["loss"], _dense(state, loss="squared")[0], rtol=1e-12)
    (user_dir / "mymod.py").rename(user_dir / "moved.py")
    res = run_cli("hessian", "run", "--top-k", "1", "--quiet", "--out", "h2.json", cwd=user_dir, env=ONE_THREAD)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert "mymod.py:build" in res.stderr and "--model" in res.stderr
    assert not (user_dir / "h2.json").exists()
    # pointing at where the code is now works (data and loss still named by the checkpoint: moved too)
    moved = ["--model", "moved.py:build", "--data", "moved.py:data", "--loss", "moved.py:loss"]
    assert main(["hessian", "run", *moved, "--top-k", "1", "--quiet", "--out", "h2.json"]) == 0


def test_train_with_own_model_data_and_loss(user_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """flatness train --model/--data/--loss on the user's module; the run records them and hessian rebuilds all three."""
    res = run_cli("train", *USER, "--loss", "mymod.py:loss", "--epochs", "1", "--batch-size", "16", "--quiet", "--out", "run",
                  cwd=user_dir, env=ONE_THREAD)  # fmt: skip
    assert res.returncode == 0, res.stderr
    config = json.loads((user_dir / "run" / "config.json").read_text())
    assert (config["model"], config["data"], config["loss"]) == ("mymod.py:build", "mymod.py:data", "mymod.py:loss")
    monkeypatch.chdir(user_dir)
    assert main(["hessian", "run", "--top-k", "1", "--dtype", "float64", "--quiet", "--out", "h.json"]) == 0
    result = json.loads((user_dir / "h.json").read_text())
    state = {k: v for k, v in torch.load(user_dir / "run" / "final.pt", weights_only=True)["state_dict"].items()}
    assert result["loss_name"] == "mymod.py:loss"
    np.testing.assert_allclose(result["loss"], _dense(state, loss="squared")[0], rtol=1e-12)
    # the trainer evaluated the user's loss (not cross-entropy) and reports no accuracy for it
    row = json.loads((user_dir / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "test_acc" not in row and "train_acc" not in row
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 5, generator=g), torch.randint(0, 3, (60,), generator=g)
    net = _reference_net()
    net.load_state_dict({k.replace("fc1", "0").replace("fc2", "2"): v for k, v in state.items()})
    with torch.no_grad():
        test_loss = 0.5 * ((net(x[40:]) - nn.functional.one_hot(y[40:], 3).float()) ** 2).sum(1).mean()
    np.testing.assert_allclose(row["test_loss"], float(test_loss), rtol=1e-5)


EXAMPLE = REPO / "examples" / "own_model.py"


def test_example_file_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """examples/own_model.py through the Python API: both models train (loss falls) and get top eigenvalues."""
    example = runpy.run_path(str(EXAMPLE))  # what `python examples/own_model.py` runs, with fewer steps
    example["main"](steps=15)
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert set(lines) == {"cnn", "transformer"}
    for text in lines.values():
        before, after = (float(v) for v in text.split(";")[0].removeprefix("loss ").split(" (")[0].split(" -> "))
        assert after < before
        assert all(float(v) > 0 for v in text.split("eigenvalues ")[1].split(", "))


def test_train_own_model_then_analyse_the_run(tmp_path: Path) -> None:
    """flatness train on the example's CNN and images, then hessian on the run directory (rebuilt from the checkpoint)."""
    spec = [f"--model={EXAMPLE}:cnn", f"--data={EXAMPLE}:images", "--model-kwargs", '{"channels": 4}']
    res = run_cli("train", *spec, "--epochs", "1", "--batch-size", "128", "--quiet", "--out", str(tmp_path / "run"), env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"] == f"{EXAMPLE}:cnn" and config["model_kwargs"] == {"channels": 4}
    assert main(["hessian", str(tmp_path / "run"), "--top-k", "1", "--samples", "128", "--quiet", "--out", str(tmp_path / "h.json")]) == 0
    result = json.loads((tmp_path / "h.json").read_text())
    assert result["model"] == f"{EXAMPLE}:cnn" and result["dataset"] == f"{EXAMPLE}:images" and result["top_eigenvalues"][0] > 0


def test_train_own_transformer_with_lm_loss(tmp_path: Path) -> None:
    """The example's transformer block on token batches (1-tuples) with its next-token loss, through train and hessian."""
    spec = [f"--model={EXAMPLE}:transformer", f"--data={EXAMPLE}:tokens", f"--loss={EXAMPLE}:lm_loss", "--model-kwargs", '{"dim": 8, "heads": 2}']
    res = run_cli("train", *spec, "--data-kwargs", '{"n_train": 64}', "--epochs", "1", "--batch-size", "32", "--quiet",
                  "--out", str(tmp_path / "run"), env=ONE_THREAD)  # fmt: skip
    assert res.returncode == 0, res.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["loss"] == f"{EXAMPLE}:lm_loss" and config["data_kwargs"] == {"n_train": 64}
    assert main(["hessian", str(tmp_path / "run"), "--top-k", "1", "--quiet", "--out", str(tmp_path / "h.json")]) == 0
    result = json.loads((tmp_path / "h.json").read_text())
    assert result["samples"] == 64 and result["loss_name"] == f"{EXAMPLE}:lm_loss" and result["top_eigenvalues"][0] > 0
