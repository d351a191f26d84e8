"""FlatnessMixin under Lightning DDP (2 CPU processes, gloo) equals a plain loop on the union of the ranks' batches.

Each rank reads every second sample (Lightning's DistributedSampler, no
shuffle); DDP averages the ranks' gradients, which is the gradient of the mean
loss over both ranks' micro-batches. With ``accumulate_grad_batches=2`` the
window's first backward pass runs under ``no_sync``. No BatchNorm (per-rank
statistics would differ from the union's).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lightning.pytorch")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import lightning_ddp_worker as worker  # noqa: E402

sys.path.remove(str(HERE))


def plain_loop(method: str, k: int, calls: int) -> dict[str, torch.Tensor]:
    net = worker.build()
    opt = worker.make_optimizer(method, net)
    ds = worker.dataset(calls * k * worker.BATCH * 2)
    x, y = ds.tensors
    shards = [torch.arange(r, len(ds), 2) for r in (0, 1)]  # DistributedSampler(shuffle=False), 2 ranks
    for c in range(calls):
        window = []
        for i in range(c * k, (c + 1) * k):
            idx = torch.cat([s[i * worker.BATCH : (i + 1) * worker.BATCH] for s in shards])
            window.append((x[idx], y[idx]))

        def closure(window=window) -> torch.Tensor:
            total = torch.zeros(())
            for xb, yb in window:
                loss = F.cross_entropy(net(xb), yb) / k
                loss.backward()
                total += loss.detach()
            return total

        opt.zero_grad(set_to_none=True)
        opt.step(closure)
    return net.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize(("method", "k"), [("sam", 2)])
def test_ddp_equals_the_plain_loop_on_the_union(method: str, k: int, tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    calls, out = 6, tmp_path / "final.pt"
    import os

    env = {**os.environ, **subprocess_env}
    res = subprocess.run([sys.executable, str(HERE / "lightning_ddp_worker.py"), method, str(k), str(out), str(calls)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = torch.load(out)
    assert saved["global_step"] == calls
    want = plain_loop(method, k, calls)
    for name, value in want.items():
        torch.testing.assert_close(saved["state_dict"][name], value, rtol=0, atol=1e-6, msg=name)
