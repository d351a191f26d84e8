"""VGG-16 with BatchNorm for CIFAR (Simonyan & Zisserman 2015; CIFAR variant)."""

from __future__ import annotations

from torch import Tensor, nn

CFG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, cfg: list, num_classes: int = 10, width_div: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                cout = v // width_div
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def vgg16_bn(num_classes: int = 10, width_div: int = 1) -> VGG:
    """VGG-16-BN; ``width_div`` > 1 divides every width (for tests)."""
    return VGG(CFG16, num_classes=num_classes, width_div=width_div)
