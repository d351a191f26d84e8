"""examples/hf_models.py and examples/timm_models.py through ``flatness hessian / surface / compare`` and the Python API.

Each model is built tiny from its example function, its weights saved as a
plain state_dict, and its top Hessian eigenvalue (float64) checked against a
dense Hessian built here by double backward (``torch.autograd.grad`` with
``create_graph=True``, one row per parameter) and ``torch.linalg.eigvalsh``.
The timm models are skipped when timm cannot be imported (it needs a
torchvision that matches the installed torch).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import h5py
import numpy as np
import pytest
import torch

from flatness.cli.main import main
from flatness.losses import ModelLoss
from tests.conftest import REPO, run_cli

pytest.importorskip("transformers")


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"flatness_example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timm_or_skip() -> None:
    try:
        import timm  # noqa: F401
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"timm cannot be imported here ({type(e).__name__}: {str(e).splitlines()[0]}); it needs a torchvision built for this torch")


N = 16
# (example file, model fn, model kwargs, data fn, data kwargs, loss fn or None for cross-entropy on (x, y))
CASES = {
    "gpt2": ("hf_models", "gpt2", {"n_embd": 4, "vocab": 8, "length": 8}, "tokens", {"n_train": N, "n_test": 8, "vocab": 8, "length": 8}, "lm_loss"),
    "bert": ("hf_models", "bert", {"hidden": 4, "vocab": 8, "length": 8}, "sentences", {"n_train": N, "n_test": 8, "vocab": 8, "length": 8}, "cls_loss"),
    "timm-resnet": ("timm_models", "resnet", {"width": 2}, "images", {"n_train": N, "n_test": 8, "size": 8}, None),
    "timm-vit": ("timm_models", "vit", {"dim": 8, "size": 8, "patch": 4}, "images", {"n_train": N, "n_test": 8, "size": 8}, None),
}


def _setup(case: str, tmp_path: Path) -> tuple[torch.nn.Module, tuple, object, list[str]]:
    """The tiny model (weights saved to tmp_path/weights.pt), its first N training samples, its loss, and the CLI flags."""
    if case.startswith("timm"):
        _timm_or_skip()
    file, model_fn, model_kw, data_fn, data_kw, loss_fn = CASES[case]
    ex = _example(file)
    torch.manual_seed(0)
    model = getattr(ex, model_fn)(**model_kw)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    train, _ = getattr(ex, data_fn)(**data_kw)
    batch = train[:N]
    path = REPO / "examples" / f"{file}.py"
    flags = ["--model", f"{path}:{model_fn}", "--model-kwargs", json.dumps(model_kw),
             "--data", f"{path}:{data_fn}", "--data-kwargs", json.dumps(data_kw)]
    if loss_fn is not None:
        flags += ["--loss", f"{path}:{loss_fn}"]
        loss = ModelLoss(getattr(ex, loss_fn), loss_fn)
    else:
        loss = ModelLoss(lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]), "cross_entropy")
    return model, batch, loss, flags


def _float64(batch: tuple) -> tuple:
    return tuple(t.double() if t.is_floating_point() else t for t in batch)


_DENSE: dict[str, float] = {}


def dense_top_eigenvalue(case: str, model: torch.nn.Module, loss, batch: tuple) -> float:  # noqa: ANN001
    """lambda_max of the dense float64 Hessian over model.parameters(), by double backward, in eval mode (cached per case)."""
    if case not in _DENSE:
        _DENSE[case] = _dense_top_eigenvalue(model, loss, batch)
    return _DENSE[case]


def _dense_top_eigenvalue(model: torch.nn.Module, loss, batch: tuple) -> float:  # noqa: ANN001
    model = model.double().eval()
    params = list(model.parameters())
    grads = torch.autograd.grad(loss(model, _float64(batch)), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = []
    for i in range(flat.numel()):
        row = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(r if r is not None else torch.zeros_like(p)).reshape(-1) for r, p in zip(row, params)]))
    H = torch.stack(rows)
    torch.testing.assert_close(H, H.T, rtol=1e-8, atol=1e-10)
    return float(torch.linalg.eigvalsh(H)[-1])


HESSIAN = ["--top-k", "1", "--dtype", "float64", "--tol", "1e-10", "--samples", str(N), "--device", "cpu", "--quiet"]


@pytest.mark.parametrize("case", list(CASES))
def test_top_eigenvalue_matches_double_backward(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``flatness hessian --model file.py:fn`` (in-process entry) and ``top_eigenvalues`` equal the dense reference."""
    from flatness.curvature import top_eigenvalues

    model, batch, loss, flags = _setup(case, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["hessian", "weights.pt", *flags, *HESSIAN, "--out", "h.json"]) == 0
    cli = json.loads((tmp_path / "h.json").read_text())["top_eigenvalues"][0]
    api = float(top_eigenvalues(model, loss, [batch], k=1, tol=1e-10, dtype=torch.float64).eigenvalues[0])
    want = dense_top_eigenvalue(case, model, loss, batch)
    assert cli == pytest.approx(want, rel=1e-7)
    assert api == pytest.approx(want, rel=1e-7)


def test_gpt2_in_a_fresh_process_surface_and_compare(tmp_path: Path, subprocess_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The real command in a subprocess, then ``surface`` (centre = the loss) and ``compare`` on two GPT-2 weight files."""
    model, batch, loss, flags = _setup("gpt2", tmp_path)
    res = run_cli("hessian", "weights.pt", *flags, *HESSIAN, "--out", "h.json", cwd=tmp_path, env=subprocess_env)
    assert res.returncode == 0, res.stderr
    want = dense_top_eigenvalue("gpt2", model, loss, batch)
    assert json.loads((tmp_path / "h.json").read_text())["top_eigenvalues"][0] == pytest.approx(want, rel=1e-7)

    monkeypatch.chdir(tmp_path)
    assert main(["surface", "weights.pt", *flags, "--dim", "1", "--x=-1:1:3", "--samples", str(N), "--quiet", "--out", "s.h5"]) == 0
    with h5py.File(tmp_path / "s.h5", "r") as f:
        centre = float(f["train_loss"][1])
    np.testing.assert_allclose(centre, float(loss(model, _float64(batch)).detach()), rtol=1e-5)

    torch.manual_seed(1)
    other = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in torch.load(tmp_path / "weights.pt").items()}
    torch.save(other, tmp_path / "other.pt")
    args = ["--samples", str(N), "--surface", "none", "--top-k", "1", "--radii", "0", "--draws", "2", "--quiet", "--out", "rep"]
    assert main(["compare", "weights.pt", "other.pt", *flags, *args]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    first = report["checkpoints"][0]
    top = first.get("lambda_max", first.get("top_eigenvalues"))
    top = float(top[0] if isinstance(top, list) else top)
    assert top == pytest.approx(want, rel=1e-4)
