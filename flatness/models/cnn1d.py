"""The 1-D convolutional network of the MNIST-1D paper (Greydanus & Kobak, 2020)."""

from __future__ import annotations

from torch import Tensor, nn


class CNN1D(nn.Module):
    """Three strided 1-D convolutions (25 channels) and a linear classifier.

    Args:
        in_features: sequence length (40 for MNIST-1D).
        channels: channels of each convolution.
        batch_norm: add BatchNorm1d after each convolution (used to test the
            BatchNorm handling of the optimizers and curvature code).
    """

    def __init__(self, in_features: int = 40, num_classes: int = 10, channels: int = 25, batch_norm: bool = False) -> None:
        super().__init__()

        def block(cin: int, k: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv1d(cin, channels, k, stride=2, padding=1)]
            if batch_norm:
                layers.append(nn.BatchNorm1d(channels))
            return layers + [nn.ReLU()]

        self.features = nn.Sequential(*block(1, 5), *block(channels, 3), *block(channels, 3))
        length = in_features
        for k in (5, 3, 3):
            length = (length + 2 - k) // 2 + 1
        self.linear = nn.Linear(channels * length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.features(x.view(x.shape[0], 1, -1)).flatten(1))
