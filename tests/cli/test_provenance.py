"""Issue 21, provenance: strict resume, checked checkpoints, fingerprints, trained-on samples, groups, locks.

Every case runs the real CLI in a subprocess. Each test was seen failing on
the code before issue 21 (typed defaults ignored on resume, a flipped byte
accepted, changed data used silently, held-out samples measured as "train",
an MSE run pooled with a cross-entropy run, two compares on one --out).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from flatness.checkpoint import read_checkpoint_file
from tests.conftest import run_cli
from tests.reliability.corrupt import flip_byte

TINY = ["--model", "mlp", "--data", "synthetic", "--batch-size", "64", "--device", "cpu", "--quiet"]


def _ok(*argv: str, cwd: Path | None = None) -> str:
    r = run_cli(*argv, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


def _refused(pattern: str, *argv: str, cwd: Path | None = None) -> str:
    """The command exits 2 with exactly one ``error:`` line matching ``pattern``."""
    import re

    r = run_cli(*argv, cwd=cwd)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint_file(path)["state_dict"]


# ---------------------------------------------------------------------------------------------- strict resume
@pytest.fixture(scope="module")
def sam_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("strict") / "sam"
    _ok("train", *TINY, "--epochs", "1", "--method", "sam", "--lr", "0.05", "--seed", "3", "--track-curvature", "2",
        "--track-samples", "16", "--out", str(run))
    return run


@pytest.mark.parametrize(("flag", "value", "pattern"), [
    ("--lr", "0.1", r"has --lr 0\.05, but 0\.1 was typed"),  # 0.1 is the default: it used to be ignored
    ("--seed", "0", r"has --seed 3, but 0 was typed"),
    ("--method", "sgd", r"has --method 'sam', but 'sgd' was typed"),
    ("--track-curvature", "0", r"has --track-curvature 2, but 0 was typed"),
    ("--momentum", "0.9", None),  # typed at the run's own value: accepted
])
def test_resume_compares_every_typed_option_at_any_value(sam_run: Path, flag: str, value: str, pattern: str | None) -> None:
    before = (sam_run / "config.json").read_bytes()
    if pattern is None:
        _ok("train", "--out", str(sam_run), "--resume", flag, value)
        return
    line = _refused(pattern, "train", "--out", str(sam_run), "--resume", flag, value)
    assert "a resumed run keeps its settings" in line
    assert (sam_run / "config.json").read_bytes() == before


def test_longer_epochs_on_resume_needs_replan_and_equals_a_run_planned_that_long(tmp_path: Path) -> None:
    """--epochs 3 on a finished 2-epoch run is refused; with --replan-schedule (constant LR) it equals a 3-epoch run."""
    short, planned = tmp_path / "short", tmp_path / "planned"
    common = [*TINY, "--method", "m-arwp", "--schedule", "constant", "--lr", "0.05"]
    _ok("train", *common, "--epochs", "2", "--out", str(short))
    _ok("train", *common, "--epochs", "3", "--out", str(planned))
    _refused(r"planned for --epochs 2 .*pass --replan-schedule", "train", "--out", str(short), "--resume", "--epochs", "3")
    _ok("train", "--out", str(short), "--resume", "--epochs", "3", "--replan-schedule")
    a, b = _weights(short / "final.pt"), _weights(planned / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in b)
    config = json.loads((short / "config.json").read_text())
    assert config["epochs"] == 3 and config["schedule_replans"] == [{"epochs_from": 2, "epochs_to": 3, "at_update": 8}]


def test_replanned_cosine_does_not_train_at_lr_zero(tmp_path: Path) -> None:
    """The old behaviour: epoch 3 of a resumed 2-epoch cosine run trained at LR 0.0. Replanned, its LR is the new plan's."""
    run = tmp_path / "cos"
    _ok("train", *TINY, "--epochs", "2", "--out", str(run))
    _ok("train", "--out", str(run), "--resume", "--epochs", "3", "--replan-schedule")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    import math

    assert rows[1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the end of the 2-epoch plan
    assert rows[2]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 12 / 12)), abs=1e-12)  # end of the new plan
    assert rows[2]["train_loss"] < rows[0]["train_loss"]


# ---------------------------------------------------------------------------------------------- checked checkpoints
@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("checked") / "run"
    _ok("train", *TINY, "--epochs", "2", "--out", str(run))
    return run


@pytest.mark.parametrize(("byte", "mask"), [(0, 0x01), (3, 0x40)], ids=["low-bits", "exponent"])
def test_a_flipped_byte_is_refused_by_every_reader(two_epoch_run: Path, tmp_path: Path, byte: int, mask: int) -> None:
    bad = tmp_path / "bad.pt"
    shutil.copy(two_epoch_run / "final.pt", bad)
    flip_byte(bad, "state_dict", "net.0.weight", byte=byte, mask=mask)
    pattern = r"checkpoint .*bad\.pt is corrupted: its content does not match the sha256 digest"
    _refused(pattern, "hessian", str(bad), "--top-k", "1", "--out", str(tmp_path / "h.json"), "--device", "cpu")
    _refused(pattern, "surface", str(bad), "--x=-1:1:3", "--out", str(tmp_path / "s.h5"), "--device", "cpu")
    _refused(pattern, "compare", str(bad), "--surface", "none", "--samples", "50", "--out", str(tmp_path / "rep"), "--device", "cpu")
    assert not (tmp_path / "h.json").exists() and not (tmp_path / "s.h5").exists() and not (tmp_path / "rep").exists()


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(two_epoch_run: Path, tmp_path: Path) -> None:
    """last.pt, final.pt and epoch 2 damaged (a momentum byte, a weight byte): resume says so, retrains epoch 2 exactly."""
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    for name in ("checkpoints/last.pt", "final.pt", "checkpoints/epoch_0002.pt"):
        _flip_momentum(run / name)
    r = run_cli("train", "--out", str(run), "--resume")
    assert r.returncode == 0, r.stderr
    assert "is corrupted" in r.stderr and "resuming from" in r.stderr and "epoch_0001.pt" in r.stderr
    a, b = _weights(run / "final.pt"), _weights(two_epoch_run / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in b)


def _flip_momentum(path: Path) -> None:
    """One byte of the first momentum buffer (optimizer state), which the weights alone would never show."""
    import struct
    import zipfile

    obj = torch.load(path, weights_only=True)
    buf = next(iter(obj["optimizer"]["state"].values()))["momentum_buffer"]
    raw = buf.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    blob = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size == len(raw) and z.read(i.filename) == raw)
    name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26 : info.header_offset + 30])
    blob[info.header_offset + 30 + name_len + extra_len] ^= 0x01
    path.write_bytes(bytes(blob))


def test_resume_with_no_checkpoint_that_verifies_is_refused(two_epoch_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    for p in [run / "final.pt", *run.glob("checkpoints/*.pt")]:
        _flip_momentum(p)
    line = _refused(r"last\.pt is corrupted.*and no other checkpoint of .* verifies", "train", "--out", str(run), "--resume")
    assert "start a new run" in line and not (run / ".lock").exists()


def test_foreign_state_dict_with_nan_is_refused_and_a_clean_one_loads(tmp_path: Path) -> None:
    from flatness.models import build_model

    net = build_model("mlp", in_features=40, num_classes=10)
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    _ok("hessian", str(tmp_path / "plain.pt"), "--model", "mlp", "--data", "synthetic", "--top-k", "1", "--out", str(tmp_path / "h.json"))
    state = net.state_dict()
    state["net.0.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    line = _refused(r"nan\.pt holds non-finite weights \(net\.0\.weight", "hessian", str(tmp_path / "nan.pt"), "--model", "mlp",
                    "--data", "synthetic", "--top-k", "1", "--out", str(tmp_path / "h2.json"))
    assert (tmp_path / "h.json").exists() and not (tmp_path / "h2.json").exists(), line


# ---------------------------------------------------------------------------------------------- fingerprints
USER = textwrap.dedent('''
    from pathlib import Path
    import torch

    def build(**kw):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def data():
        x, y = torch.load(Path(__file__).with_name("points.pt"))
        return (x[:96], y[:96]), (x[96:], y[96:])
''')


@pytest.fixture
def user_run(tmp_path: Path) -> Path:
    """A run on the user's model and data (data read from points.pt beside the code), trained from ``tmp_path/work``."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.py").write_text(USER)
    g = torch.Generator().manual_seed(0)
    torch.save((torch.randn(128, 6, generator=g), torch.randint(0, 3, (128,), generator=g)), work / "points.pt")
    _ok("train", "--model", "mine.py:build", "--data", "mine.py:data", "--epochs", "1", "--batch-size", "32", "--device", "cpu",
        "--quiet", "--val-split", "16", "--out", "run", cwd=work)
    return work / "run"


def test_data_that_changed_since_training_is_refused_unless_allowed(user_run: Path, tmp_path: Path) -> None:
    work = user_run.parent
    g = torch.Generator().manual_seed(1)  # other samples, same shapes
    torch.save((torch.randn(128, 6, generator=g), torch.randint(0, 3, (128,), generator=g)), work / "points.pt")
    out = tmp_path / "h.json"
    _refused(r"'mine\.py:data' now gives other train samples .*pass --allow-changed data", "hessian", "run", "--top-k", "1",
             "--out", str(out), cwd=work)
    _refused(r"now gives other train samples .*--allow-changed data", "train", "--out", "run", "--resume", cwd=work)
    _ok("hessian", "run", "--top-k", "1", "--out", str(out), "--allow-changed", "data", cwd=work)
    accepted = json.loads(out.read_text())["provenance"]["accepted_changes"]
    assert len(accepted) == 2 and all("--allow-changed data" in a for a in accepted)


def test_code_that_changed_since_training_is_refused_unless_allowed(user_run: Path, tmp_path: Path) -> None:
    work = user_run.parent
    (work / "mine.py").write_text(USER + "\n# edited after training\n")
    _refused(r"model code .*mine\.py differs from .*--allow-changed code", "hessian", "run", "--top-k", "1", "--out",
             str(tmp_path / "h.json"), cwd=work)
    _ok("hessian", "run", "--top-k", "1", "--out", str(tmp_path / "h.json"), "--allow-changed", "code", cwd=work)
    accepted = json.loads((tmp_path / "h.json").read_text())["provenance"]["accepted_changes"]
    # mine.py holds the model and the data code: both roles changed, both are recorded
    assert sorted(a.split(": ")[1].split(" code")[0] for a in accepted) == ["data", "model"]
    assert all(a.startswith("accepted with --allow-changed code") for a in accepted)


def test_file_specs_resolve_from_the_run_directory(user_run: Path, tmp_path: Path) -> None:
    """The run recorded 'mine.py:build' relative to where it trained; measured from another folder it is still found."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "h.json"
    _ok("hessian", str(user_run), "--top-k", "1", "--out", str(out), cwd=elsewhere)
    code = json.loads(out.read_text())["provenance"]["run"]["code"]
    assert code["model"]["relative_to_run"] == "../mine.py" and Path(code["model"]["file"]).is_absolute()


# ---------------------------------------------------------------------------------------------- trained-on samples
def test_train_measures_use_only_the_samples_the_run_trained_on(user_run: Path, tmp_path: Path) -> None:
    """With --val-split 16 of 96, 'train' = the 80 trained on; the eigenvalue equals one computed on exactly those rows."""
    from flatness.checkpoint import load_checkpoint
    from flatness.curvature import top_eigenvalues
    from flatness.data.splits import split_validation
    from flatness.provenance.digest import indices_digest

    work = user_run.parent
    out = tmp_path / "h.json"
    _ok("hessian", "run", "--top-k", "1", "--tol", "1e-8", "--out", str(out), cwd=work)
    result = json.loads(out.read_text())
    train_idx, val_idx = split_validation(96, 16, 0)
    samples = result["provenance"]["samples"]
    assert samples["split"] == "train" and samples["count"] == 80 and samples["of"] == 80
    assert samples["indices_sha256"] == indices_digest(train_idx)
    x, y = torch.load(work / "points.pt")
    import sys

    sys.path.insert(0, str(work))
    try:
        net = load_checkpoint(user_run / "final.pt", model=f"{work / 'mine.py'}:build").model
    finally:
        sys.path.remove(str(work))
    ref = top_eigenvalues(net, torch.nn.functional.cross_entropy, [(x[train_idx], y[train_idx])], k=1, tol=1e-10).eigenvalues[0]
    assert result["top_eigenvalues"][0] == pytest.approx(float(ref), rel=1e-5)
    _ok("hessian", "run", "--top-k", "1", "--split", "val", "--out", str(tmp_path / "v.json"), cwd=work)
    val = json.loads((tmp_path / "v.json").read_text())["provenance"]["samples"]
    assert val["count"] == 16 and val["indices_sha256"] == indices_digest(val_idx)


def test_val_split_of_a_run_without_one_is_refused(two_epoch_run: Path, tmp_path: Path) -> None:
    line = _refused(r"trained without --val-split, so there is no validation split", "hessian", str(two_epoch_run), "--split", "val",
                    "--top-k", "1", "--out", str(tmp_path / "h.json"))
    assert "use --split train or test" in line and not (tmp_path / "h.json").exists()


# ---------------------------------------------------------------------------------------------- compare: groups, provenance, lock
def test_compare_never_pools_runs_of_other_configurations(tmp_path: Path) -> None:
    """A cross-entropy run and an MSE run of 'sgd' are two groups labelled by the difference; seeds of one config pool."""
    runs = tmp_path / "runs"
    _ok("train", *TINY, "--epochs", "1", "--out", str(runs / "ce0"))
    _ok("train", *TINY, "--epochs", "1", "--seed", "1", "--out", str(runs / "ce1"))
    _ok("train", *TINY, "--epochs", "1", "--loss", "mse", "--val-split", "32", "--out", str(runs / "mse0"))
    rep = tmp_path / "rep"
    _ok("compare", str(runs / "ce0"), str(runs / "ce1"), str(runs / "mse0"), "--surface", "none", "--samples", "50", "--top-k", "1",
        "--out", str(rep))
    data = json.loads((rep / "report.json").read_text())
    groups = data["groups"]
    assert len(groups) == 2
    ce = next(g for name, g in groups.items() if "cross_entropy" in name)
    mse = next(g for name, g in groups.items() if "mse" in name)
    assert ce["seeds"] == [0, 1] and mse["seeds"] == [0]
    assert {"loss", "val_split"} <= set(mse["differs_by"])
    for entry in data["checkpoints"]:
        prov = entry["provenance"]
        assert prov["checkpoint"]["sha256"] == read_checkpoint_file(entry["path"])["digest"]["value"]
        assert prov["samples"]["split"] == "train" and prov["run"]["data"]["train"]["sha256"]
    html = (rep / "report.html").read_text()
    assert "<h2>Provenance</h2>" in html and data["checkpoints"][0]["provenance"]["checkpoint"]["sha256"][:16] in html


def test_labels_that_pool_two_configurations_are_refused(tmp_path: Path) -> None:
    from flatness.errors import FlatnessError
    from flatness.report import CompareSettings, compare

    _ok("train", *TINY, "--epochs", "1", "--out", str(tmp_path / "a"))
    _ok("train", *TINY, "--epochs", "1", "--seed", "1", "--lr", "0.05", "--out", str(tmp_path / "b"))
    with pytest.raises(FlatnessError, match=r"group 'sgd' would pool .* differ in more than the seed \(lr: 0\.1 vs 0\.05\)"):
        compare([tmp_path / "a", tmp_path / "b"], tmp_path / "rep", CompareSettings(samples=50, surface="none"), labels=["sgd", "sgd"])
    assert not (tmp_path / "rep").exists()


def test_compare_out_is_locked(two_epoch_run: Path, tmp_path: Path) -> None:
    rep = tmp_path / "rep"
    rep.mkdir()
    fd = os.open(rep / ".lock", os.O_RDONLY | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another compare holds it
        _refused(r"report folder .*rep is in use by another flatness compare", "compare", str(two_epoch_run), "--surface", "none",
                 "--samples", "50", "--top-k", "1", "--out", str(rep))
        assert not (rep / "report.json").exists()
    finally:
        os.close(fd)
    _ok("compare", str(two_epoch_run), "--surface", "none", "--samples", "50", "--top-k", "1", "--out", str(rep))
    assert (rep / "report.json").exists() and not (rep / ".lock").exists()
