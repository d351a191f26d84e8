import sys
from pathlib import Path

import pytest
import torch

# Make the repository root importable however pytest is launched.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture(autouse=True)
def _single_thread():
    """The optim tests use tiny models: one intra-op thread is faster and,
    on a busy machine, avoids OpenMP threads spinning against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
