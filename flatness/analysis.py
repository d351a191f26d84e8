"""What every analysis command starts from: a checkpoint, fixed batches and a loss.

``prepare_analysis`` loads the checkpoint, finds its dataset (from the
checkpoint's config unless overridden), and returns the first ``samples`` of
the chosen split as device-resident batches, in dataset order and without
augmentation, plus a mean-reduced cross-entropy loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from flatness.checkpoint import Checkpoint, load_checkpoint
from flatness.data import analysis_batches, load_dataset
from flatness.errors import FlatnessError

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Analysis:
    checkpoint: Checkpoint
    batches: list[tuple[Tensor, Tensor]]
    loss_fn: LossFn
    dataset: str
    split: str
    samples: int

    @property
    def model(self) -> nn.Module:
        return self.checkpoint.model


def prepare_analysis(
    path: str | Path,
    *,
    model: str | None = None,
    data: str | None = None,
    data_dir: str | Path | None = None,
    split: str = "train",
    samples: int | None = None,
    batch_size: int = 1000,
    device: torch.device | str = "cpu",
) -> Analysis:
    """Load ``path`` and the fixed analysis batches for it.

    Raises:
        FlatnessError: bad checkpoint, unknown dataset, or a dataset that
            does not fit the model.
    """
    ckpt = load_checkpoint(path, model=model, device=device)
    name = data or ckpt.dataset
    if name is None:
        raise FlatnessError(f"checkpoint {path} does not say which dataset it was trained on: pass --data")
    data_dir = data_dir if data_dir is not None else ckpt.config.get("data_dir")
    ds = load_dataset(name, data_dir, augment=False)
    part = ds.split(split)
    batches = analysis_batches(part, samples=samples, batch_size=batch_size, device=device)
    x0 = batches[0][0][:1]
    try:
        with torch.no_grad():
            out = ckpt.model(x0)
    except RuntimeError as e:
        raise FlatnessError(f"model {ckpt.model_name!r} of {path} does not take {name} inputs: {str(e).splitlines()[0]}") from None
    if out.shape[-1] != ds.num_classes:
        raise FlatnessError(f"model of {path} has {out.shape[-1]} outputs, but {name} has {ds.num_classes} classes")
    n = sum(int(b[1].shape[0]) for b in batches)
    return Analysis(ckpt, batches, nn.functional.cross_entropy, name, split, n)
