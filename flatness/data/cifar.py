"""CIFAR-10 / CIFAR-100 from the standard python-pickle batches (no download).

Layouts accepted in ``--data-dir`` (the folder itself or the archive's
folder inside it):

- CIFAR-10: ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``
- CIFAR-100: ``cifar-100-python/train`` and ``test`` (``fine_labels``)

The batches are pickles, so they are read with a restricted unpickler that
only admits plain containers and numpy arrays: a crafted file cannot run code.
Images are held as normalized float32 tensors (N, 3, 32, 32); training
augmentation (random crop with 4-pixel zero padding, horizontal flip,
optional cutout) runs batched on the training device.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flatness.data.base import Dataset, Split
from flatness.errors import FlatnessError

MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle API
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = path.read_bytes()
        obj = _SafeUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise FlatnessError(f"cannot read CIFAR batch {path}: {e}") from None
    if not isinstance(obj, dict):
        raise FlatnessError(f"CIFAR batch {path} holds a {type(obj).__name__}, expected a dict")
    obj = {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}
    if "data" not in obj or label_key not in obj:
        raise FlatnessError(f"CIFAR batch {path} lacks 'data' or {label_key!r}")
    data = np.asarray(obj["data"], dtype=np.uint8)
    labels = np.asarray(obj[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise FlatnessError(f"CIFAR batch {path} has data of shape {data.shape}, expected (N, 3072) with N labels")
    return data, labels


def _find_root(data_dir: Path, sub: str, first: str) -> Path:
    for root in (data_dir / sub, data_dir):
        if (root / first).is_file():
            return root
    raise FlatnessError(f"--data-dir {data_dir} does not hold {sub}/{first} (the python-pickle CIFAR batches)")


def _to_split(parts: list[tuple[np.ndarray, np.ndarray]], name: str) -> Split:
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    x = torch.from_numpy(data).view(-1, 3, 32, 32).float().div_(255.0)
    mean = torch.tensor(MEAN[name]).view(1, 3, 1, 1)
    std = torch.tensor(STD[name]).view(1, 3, 1, 1)
    return Split((x - mean) / std, torch.from_numpy(labels))


def load_cifar(name: str, data_dir: Path, *, cutout: int = 0, augment: bool = True) -> Dataset:
    """Read CIFAR-10 or CIFAR-100 from ``data_dir``."""
    sub, train_files, test_files, label_key, classes = FILES[name]
    if not data_dir.is_dir():
        raise FlatnessError(f"--data-dir {data_dir} is not a folder")
    root = _find_root(data_dir, sub, train_files[0])
    missing = [f for f in train_files + test_files if not (root / f).is_file()]
    if missing:
        raise FlatnessError(f"--data-dir {root} lacks {', '.join(missing)}")
    train = _to_split([_read_batch(root / f, label_key) for f in train_files], name)
    test = _to_split([_read_batch(root / f, label_key) for f in test_files], name)
    if int(train.y.max()) >= classes or int(test.y.max()) >= classes or int(train.y.min()) < 0:
        raise FlatnessError(f"labels in {root} fall outside 0..{classes - 1}; is this {name}?")

    def aug(x: Tensor, generator: torch.Generator) -> Tensor:
        return augment_batch(x, generator, cutout=cutout)

    return Dataset(name, train, test, classes, augment=aug if augment else None, info={"root": str(root), "cutout": cutout})


def augment_batch(x: Tensor, generator: torch.Generator, *, pad: int = 4, cutout: int = 0) -> Tensor:
    """Random crop (zero padding ``pad``), horizontal flip and optional cutout, batched.

    All random numbers come from ``generator`` (on ``x``'s device), so a batch's
    augmentation is reproducible from the generator state.
    """
    n, c, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    out = padded[batch, chan, rows, cols]
    flip = torch.rand(n, generator=generator, device=dev) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(3), out)
    if cutout > 0:
        cy = torch.randint(0, h, (n,), generator=generator, device=dev)
        cx = torch.randint(0, w, (n,), generator=generator, device=dev)
        ys = torch.arange(h, device=dev)[None, :]
        xs = torch.arange(w, device=dev)[None, :]
        in_y = (ys >= cy[:, None] - cutout // 2) & (ys < cy[:, None] - cutout // 2 + cutout)
        in_x = (xs >= cx[:, None] - cutout // 2) & (xs < cx[:, None] - cutout // 2 + cutout)
        hole = in_y[:, :, None] & in_x[:, None, :]
        out = out.masked_fill(hole[:, None, :, :], 0.0)
    return out
