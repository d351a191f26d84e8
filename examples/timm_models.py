"""timm image models with flatness: a ResNet and a Vision Transformer, built small (no pretrained weights).

``pip install 'flatness[timm]'`` (timm needs a torchvision that matches your
torch build: with a CPU-only torch, install torchvision from the same index,
e.g. ``--index-url https://download.pytorch.org/whl/cpu``).

Command line::

    python -m flatness train --model examples/timm_models.py:resnet --data examples/timm_models.py:images \\
        --method m-arwp --epochs 3 --out runs/timm-resnet
    python -m flatness hessian runs/timm-resnet --top-k 3 --out resnet.json
    python -m flatness surface runs/timm-resnet --dim 2 --x=-1:1:11 --y=-1:1:11 --out resnet.h5

    python -m flatness train --model examples/timm_models.py:vit --data examples/timm_models.py:images \\
        --method sam --epochs 3 --out runs/timm-vit
    python -m flatness compare runs/timm-resnet runs/timm-vit --samples 256 --out report

Any other timm architecture works the same way: return
``timm.create_model(name, pretrained=False, num_classes=..., in_chans=...)``
from your own ``file.py:function``.

Python: :func:`main` trains each model a few SAM steps and prints
lambda_max through :func:`flatness.curvature.top_eigenvalues`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset


def resnet(width: int = 8, classes: int = 4, in_chans: int = 1) -> nn.Module:
    """``--model examples/timm_models.py:resnet``: a timm ResNet-10 of BasicBlocks (BatchNorm), ``width`` channels wide."""
    from timm.models.resnet import BasicBlock, ResNet

    channels = (width, width, 2 * width, 2 * width)
    # the "deep" stem (three 3x3 convolutions) is as narrow as the stages; the default stem has 64 channels
    return ResNet(BasicBlock, [1, 1, 1, 1], channels=channels, stem_type="deep", stem_width=max(1, width // 2),
                  num_classes=classes, in_chans=in_chans)


def vit(dim: int = 16, depth: int = 1, heads: int = 2, size: int = 12, patch: int = 4, classes: int = 4, in_chans: int = 1) -> nn.Module:
    """``--model examples/timm_models.py:vit``: a timm VisionTransformer on ``size`` x ``size`` images."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=size, patch_size=patch, in_chans=in_chans, num_classes=classes, embed_dim=dim, depth=depth,
        num_heads=heads, mlp_ratio=2.0,
    )
    for module in model.modules():  # plain attention matmuls: the fused CPU kernel has no double backward
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


def images(n_train: int = 512, n_test: int = 256, size: int = 12) -> tuple[TensorDataset, TensorDataset]:
    """``--data examples/timm_models.py:images``: 1 x size x size noisy bars, 4 classes (as in examples/own_model.py)."""
    g = torch.Generator().manual_seed(0)
    i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    patterns = torch.stack([(i % 4 == 0), (j % 4 == 0), ((i + j) % 4 == 0), ((i - j) % 4 == 0)]).float()

    def make(n: int) -> TensorDataset:
        y = torch.arange(n) % 4
        x = patterns[y] + 0.8 * torch.randn(n, size, size, generator=g)
        return TensorDataset(x.unsqueeze(1), y)

    return make(n_train), make(n_test)


def main(steps: int = 20) -> dict[str, float]:
    """SAM for ``steps`` steps on each model (plain loop), then lambda_max on 64 training samples."""
    from flatness.curvature import top_eigenvalues
    from flatness.optim import SAM

    torch.manual_seed(0)
    train, _ = images()
    batches = [train[i : i + 32] for i in range(0, 256, 32)]
    results = {}
    for name, model in (("resnet", resnet()), ("vit", vit())):
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, rho=0.05, model=model)
        model.train()
        for step in range(steps):
            x, y = batches[step % len(batches)]

            def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.zero_grad()
            opt.step(closure)
        eig = top_eigenvalues(model, F.cross_entropy, [train[:64]], k=1)
        results[name] = float(eig.eigenvalues[0])
        print(f"{name}: lambda_max {results[name]:.4g} after {steps} SAM steps")
    return results


if __name__ == "__main__":
    main()
