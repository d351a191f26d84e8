"""A ReLU multilayer perceptron for MNIST-1D."""

from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """``depth`` hidden layers of width ``hidden`` with ReLU, then a linear classifier."""

    def __init__(self, in_features: int = 40, num_classes: int = 10, hidden: int = 100, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))
