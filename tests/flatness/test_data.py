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


def test_mnist1d_default_shapes_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLATNESS_CACHE", str(tmp_path))
    ds = load_dataset("mnist1d")
    assert ds.train.x.shape == (4000, 40) and ds.test.x.shape == (1000, 40)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    assert ds.num_classes == 10 and set(ds.train.y.tolist()) == set(range(10))
    assert (tmp_path / "mnist1d_v1.npz").exists()
    again = load_dataset("mnist1d")  # from the cache
    assert torch.equal(again.train.x, ds.train.x) and torch.equal(again.test.y, ds.test.y)


def test_mnist1d_matches_package_generation() -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    ref = make_dataset(get_dataset_args())
    ds = load_dataset("mnist1d")
    np.testing.assert_array_equal(ds.train.x.numpy(), ref["x"].astype(np.float32))
    np.testing.assert_array_equal(ds.test.y.numpy(), ref["y_test"])


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
