"""The offline demo behind ``flatness demo``: train on MNIST-1D and summarise."""

from __future__ import annotations

from pathlib import Path

from flatness.errors import FlatnessError
from flatness.training import TrainConfig, train


def run_demo(out: str | Path, *, epochs: int = 30, seed: int = 0, device: str = "auto", force: bool = False, quiet: bool = True) -> str:
    """Train the 1-D CNN on MNIST-1D with SGD into ``out/runs/sgd``; return a summary text."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FlatnessError(f"demo folder {out} already exists; pass --force to replace it")
    config = TrainConfig(model="cnn1d", data="mnist1d", method="sgd", epochs=epochs, seed=seed)
    result = train(config, out / "runs" / "sgd", device=device, force=force, quiet=quiet)
    last = result.metrics[-1]
    return (
        f"MNIST-1D, cnn1d, SGD, {epochs} epochs, seed {seed}: "
        f"test accuracy {last['test_acc']:.2f}%, test loss {last['test_loss']:.4f}, "
        f"train loss {last['train_loss']:.4f} ({result.seconds:.1f}s)\nrun directory: {result.run_dir}"
    )
