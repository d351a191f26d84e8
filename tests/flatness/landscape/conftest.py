"""Landscape tests: tiny models, one intra-op thread.

The models here are tiny; with several OpenMP threads on a shared 2-core
machine their barriers spin against other processes and a 1 ms forward can
take 50 ms. One thread keeps the tests fast and their timings stable.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
