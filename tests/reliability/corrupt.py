"""Damage a torch.save checkpoint in place, the way a bad disk or a bad copy does: one byte of one tensor."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import torch


def tensor_data_offset(path: Path, key: str, tensor_name: str | None = None) -> tuple[int, torch.Tensor]:
    """Byte offset in ``path`` where the storage of ``ckpt[key][tensor_name]`` (or ``ckpt[key]``) starts, and the tensor.

    torch.save writes each storage as an uncompressed zip member ``archive/data/N``;
    the member whose bytes equal the tensor's is the one to damage.
    """
    obj = torch.load(path, weights_only=True)
    t = obj[key] if tensor_name is None else obj[key][tensor_name]
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    blob = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if "/data/" not in info.filename or info.file_size != len(raw) or z.read(info.filename) != raw:
                continue
            name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26 : info.header_offset + 30])
            return info.header_offset + 30 + name_len + extra_len, t
    raise LookupError(f"no storage of {key}/{tensor_name} found in {path}")


def flip_byte(path: Path, key: str, tensor_name: str | None = None, *, byte: int = 0, mask: int = 0x01) -> None:
    """XOR one byte of a tensor's stored data with ``mask`` (byte 0 of a float32 is its lowest mantissa bits; byte 3 holds the exponent)."""
    offset, _ = tensor_data_offset(path, key, tensor_name)
    blob = bytearray(path.read_bytes())
    blob[offset + byte] ^= mask
    path.write_bytes(bytes(blob))
