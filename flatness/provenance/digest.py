"""Content digests: sha256 over tensors' bytes and plain values, in a fixed order.

A checkpoint's digest (DESIGN.md section 9) is computed from the payload as
Python objects, not from the file's bytes: the same weights, optimizer state
and values give the same digest however ``torch.save`` lays the archive out,
and a flipped bit in any tensor or value changes it. Every tensor contributes
its dtype, shape and raw bytes (bfloat16 and other dtypes NumPy lacks are read
as bytes); dicts contribute their keys in sorted order, lists and tuples their
items in order, and scalars a type tag with an exact ``repr`` (floats
round-trip through ``repr``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

ALGORITHM = "sha256"


def tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of ``t`` (on the host, contiguous), whatever its dtype."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _update(h: Any, obj: Any) -> None:
    """Feed ``obj`` into the hash ``h`` with type tags, so that different structures never collide."""
    if isinstance(obj, Tensor):
        h.update(f"T{obj.dtype}{tuple(obj.shape)}".encode())
        h.update(tensor_bytes(obj))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _update(h, key)
            _update(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for item in obj:
            _update(h, item)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"S{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, (torch.dtype, torch.device, torch.Size)):
        h.update(f"S{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"cannot digest a value of type {type(obj).__name__}; checkpoints hold tensors and plain values")


def content_digest(obj: Any) -> str:
    """Hex sha256 of a nested structure of tensors and plain values.

    Example:
        >>> content_digest({"w": torch.zeros(2)}) == content_digest({"w": torch.zeros(2)})
        True
        >>> content_digest({"w": torch.zeros(2)}) == content_digest({"w": torch.ones(2)})
        False
    """
    h = hashlib.sha256()
    _update(h, obj)
    return h.hexdigest()


def indices_digest(indices: Tensor | Iterable[int]) -> str:
    """Hex sha256 of a list of sample indices (as int64), e.g. the samples a measure used."""
    t = indices if isinstance(indices, Tensor) else torch.tensor(list(indices), dtype=torch.int64)
    return hashlib.sha256(tensor_bytes(t.to(torch.int64))).hexdigest()


def file_digest(path: Any) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
