import sys
from pathlib import Path

import pytest
import torch

# The helpers beside this file (optim_helpers, optim_parallel_worker) are imported by name, also
# by spawned children. Only this folder goes on sys.path, never the repository root: the tests
# must import the installed ``flatness``, not a stray module from the checkout.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(autouse=True)
def _single_thread():
    """The optim tests use tiny models: one intra-op thread is faster and,
    on a busy machine, avoids OpenMP threads spinning against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
