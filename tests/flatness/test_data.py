"""Datasets: MNIST-1D generation and cache, CIFAR pickle reader, augmentation, analysis batches."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from flatness.data import analysis_batches, load_dataset
from flatness.data.cifar import augment_batch
from flatness.errors import FlatnessError


@pytest.fixture(scope="module")
def mnist1d_reference() -> dict[str, np.ndarray]:
    """MNIST-1D straight from the mnist1d package's own generator, with its default arguments."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


def _assert_mnist1d(ds, ref: dict[str, np.ndarray]) -> None:  # noqa: ANN001 - a Dataset
    got = {"x": ds.train.x, "y": ds.train.y, "x_test": ds.test.x, "y_test": ds.test.y}
    for key, tensor in got.items():
        assert tensor.dtype == (torch.float32 if key.startswith("x") else torch.int64), key
        np.testing.assert_array_equal(tensor.numpy(), ref[key].astype(tensor.numpy().dtype), err_msg=key)
    assert ds.num_classes == 10 and ds.train.x.shape == (4000, 40) and ds.test.x.shape == (1000, 40)


def test_mnist1d_matches_package_generator_generated_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mnist1d_reference: dict[str, np.ndarray]
) -> None:
    monkeypatch.setenv("FLATNESS_CACHE", str(tmp_path))  # an empty cache: the loader generates
    _assert_mnist1d(load_dataset("mnist1d"), mnist1d_reference)
    assert (tmp_path / "mnist1d_v1.npz").exists()
    monkeypatch.setattr("flatness.data.mnist1d._generate", lambda: pytest.fail("the cache was not used"))
    _assert_mnist1d(load_dataset("mnist1d"), mnist1d_reference)  # from the cache


def test_mnist1d_damaged_cache_is_reported_and_regenerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, mnist1d_reference: dict[str, np.ndarray]
) -> None:
    monkeypatch.setenv("FLATNESS_CACHE", str(tmp_path))
    monkeypatch.setattr("flatness.data.mnist1d._generate", lambda: dict(mnist1d_reference))
    (tmp_path / "mnist1d_v1.npz").write_bytes(b"PK\x03\x04 not a zip")
    with caplog.at_level("WARNING", logger="flatness"):
        _assert_mnist1d(load_dataset("mnist1d"), mnist1d_reference)
    assert any("mnist1d_v1.npz is damaged" in r.getMessage() for r in caplog.records), caplog.text
    with np.load(tmp_path / "mnist1d_v1.npz") as f:  # rewritten whole
        np.testing.assert_array_equal(f["y_test"], mnist1d_reference["y_test"])


def test_mnist1d_unwritable_cache_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, mnist1d_reference: dict[str, np.ndarray]
) -> None:
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("FLATNESS_CACHE", str(tmp_path / "a_file" / "cache"))  # cannot be created, not even by root
    monkeypatch.setattr("flatness.data.mnist1d._generate", lambda: dict(mnist1d_reference))
    with caplog.at_level("WARNING", logger="flatness"):
        _assert_mnist1d(load_dataset("mnist1d"), mnist1d_reference)
    assert any("cannot write the MNIST-1D cache" in r.getMessage() and "FLATNESS_CACHE" in r.getMessage() for r in caplog.records), caplog.text


def _write_cifar10(root: Path, n: int = 6, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    return root


def test_cifar10_reader(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.train.x.shape == (30, 3, 32, 32) and ds.test.x.shape == (6, 3, 32, 32)
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    first = torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32)).float() / 255
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(3, 1, 1)
    std = torch.tensor((0.2470, 0.2435, 0.2616)).view(3, 1, 1)
    torch.testing.assert_close(ds.train.x[0], (first - mean) / std)
    assert ds.train.y[:6].tolist() == raw[b"labels"]


def test_cifar100_reader(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("train", "test"):
        (folder / name).write_bytes(pickle.dumps({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"fine_labels": [0, 99, 5, 7]}))
    ds = load_dataset("cifar100", tmp_path)
    assert ds.num_classes == 100 and ds.train.y.tolist() == [0, 99, 5, 7]


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def test_cifar_reader_refuses_code(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    target = tmp_path / "pwned.txt"
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(str(target)), b"labels": []}))
    with pytest.raises(FlatnessError, match="refusing to load"):
        load_dataset("cifar10", tmp_path)
    assert not target.exists()


@pytest.mark.parametrize(
    "setup, pattern",
    [
        (lambda p: None, "lacks cifar-10-batches-py/data_batch_1|does not hold"),
        (lambda p: (_write_cifar10(p), (p / "cifar-10-batches-py" / "test_batch").unlink()), "lacks test_batch"),
        (lambda p: (_write_cifar10(p), (p / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"garbage")), "cannot read CIFAR batch"),
    ],
)
def test_cifar_reader_errors(tmp_path: Path, setup, pattern: str) -> None:
    setup(tmp_path)
    with pytest.raises(FlatnessError, match=pattern):
        load_dataset("cifar10", tmp_path)


def test_cifar_needs_data_dir() -> None:
    with pytest.raises(FlatnessError, match="--data-dir"):
        load_dataset("cifar10")


def test_unknown_dataset() -> None:
    with pytest.raises(FlatnessError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")


def test_augmentation_crop_flip_cutout() -> None:
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    a, b = augment_batch(x, g1, cutout=8), augment_batch(x, g2, cutout=8)
    assert a.shape == x.shape and torch.equal(a, b)
    # Without cutout, each output row is a (possibly flipped) shifted window of the zero-padded input.
    out = augment_batch(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        found = any(
            torch.equal(out[i], w) or torch.equal(out[i], w.flip(2))
            for oy in range(9)
            for ox in range(9)
            for w in [padded[i, :, oy : oy + 32, ox : ox + 32]]
        )
        assert found
    holes = (augment_batch(x + 1, torch.Generator().manual_seed(1), pad=0, cutout=8) == 0).all(1).sum(dim=(1, 2))
    assert ((holes > 0) & (holes <= 64)).all()


def test_analysis_batches_are_first_samples_in_order() -> None:
    ds = load_dataset("synthetic")
    batches = analysis_batches(ds.train, samples=50, batch_size=20)
    assert [b[0].shape[0] for b in batches] == [20, 20, 10]
    assert torch.equal(torch.cat([b[0] for b in batches]), ds.train.x[:50])
    with pytest.raises(FlatnessError, match="positive"):
        analysis_batches(ds.train, samples=0)
    with pytest.raises(FlatnessError, match="more than"):
        analysis_batches(ds.train, samples=10**6)


# ---------------------------------------------------------------- the user's own data (--data module:fn)
USER_DATA = '''
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

g = torch.Generator().manual_seed(0)
X, Y = torch.randn(30, 4, generator=g), torch.arange(30) % 3
TOKENS = torch.randint(0, 9, (30, 6), generator=g)


class Dicts(Dataset):
    def __len__(self):
        return 30

    def __getitem__(self, i):
        return {"ids": TOKENS[i], "label": int(Y[i])}


class Stream(IterableDataset):
    def __iter__(self):
        return iter(zip(X, Y))


def loaders():  # shuffling loader: read in dataset order
    return DataLoader(TensorDataset(X, Y), batch_size=7, shuffle=True), DataLoader(TensorDataset(X[:9], Y[:9]), batch_size=4)

def tensors():
    return (X, Y), [X[:5], Y[:5]]

def dicts():
    return Dicts(), Dicts()

def stream():
    return Stream(), TensorDataset(X[:3], Y[:3])

def tokens(n=30):
    return TensorDataset(TOKENS[:n]), TensorDataset(TOKENS[:4])

def one():
    return TensorDataset(X, Y)

def strings():
    return [("a", 1)], [("b", 2)]

def mixed():
    return TensorDataset(X, Y), TensorDataset(X)

def ragged():
    return (X, Y[:10]), (X, Y)

def uneven():  # samples of different lengths: torch's collate cannot stack them
    return [(torch.zeros(i + 1), 0) for i in range(4)], [(torch.zeros(2), 1)]
'''


@pytest.fixture
def user_data(tmp_path: Path) -> str:
    (tmp_path / "userdata.py").write_text(USER_DATA)
    return str(tmp_path / "userdata.py")


def _user_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=g)
    return x, torch.arange(30) % 3, torch.randint(0, 9, (30, 6), generator=g)


@pytest.mark.parametrize("fn", ["loaders", "tensors", "stream"])
def test_user_data_pairs_in_dataset_order(user_data: str, fn: str) -> None:
    x, y, _ = _user_tensors()
    ds = load_dataset(f"{user_data}:{fn}")
    assert ds.train.classic and torch.equal(ds.train.x, x) and torch.equal(ds.train.y, y)
    assert ds.num_classes == 3 and ds.input_shape == (4,)
    batches = analysis_batches(ds.train, samples=20, batch_size=8)
    assert [type(b) for b in batches] == [tuple] * 3 and torch.equal(torch.cat([b[0] for b in batches]), x[:20])


def test_user_data_keeps_sample_structure(user_data: str) -> None:
    _, y, tokens = _user_tensors()
    ds = load_dataset(f"{user_data}:dicts")
    batch = analysis_batches(ds.train, batch_size=8)[0]
    assert set(batch) == {"ids", "label"} and torch.equal(batch["ids"], tokens[:8]) and torch.equal(batch["label"], y[:8])
    assert ds.num_classes is None  # not an (x, y) pair
    ds = load_dataset(f"{user_data}:tokens", kwargs={"n": 12})  # 1-tuples stay 1-tuples; kwargs reach the callable
    batch = analysis_batches(ds.train, batch_size=5)[-1]
    assert isinstance(batch, tuple) and len(batch) == 1 and torch.equal(batch[0], tokens[10:12])


@pytest.mark.parametrize(
    "fn, pattern",
    [
        ("one", r"must return \(train, test\) datasets or DataLoaders; it returned a torch.utils.data.dataset.TensorDataset"),
        ("strings", r"the train data of .* holds .*; samples must be tensors, numbers or arrays"),
        ("mixed", r"differ in structure: \(float32\[4\], int64\[\]\) vs \(float32\[4\]\)"),
        ("ragged", r"cannot be held as tensors: the tensors of a split must share their first dimension"),
        ("uneven", r"the train data of .* cannot be read into tensors: stack expects each tensor to be equal size"),
        ("nothing", r"has no attribute 'nothing'"),
    ],
)
def test_user_data_errors(user_data: str, fn: str, pattern: str) -> None:
    with pytest.raises(FlatnessError, match=pattern):
        load_dataset(f"{user_data}:{fn}")
    with pytest.raises(FlatnessError, match="does not take these arguments"):
        load_dataset(f"{user_data}:loaders", kwargs={"colour": 1})
