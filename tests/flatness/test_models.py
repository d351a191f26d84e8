"""Models: shapes, forward/backward, CIFAR ResNet-18 parameter names."""

from __future__ import annotations

import pytest
import torch

from flatness.errors import FlatnessError
from flatness.models import MODEL_NAMES, build_model

SMALL = {
    "mlp": ({"in_features": 40, "num_classes": 10}, (3, 40)),
    "cnn1d": ({"in_features": 40, "num_classes": 10}, (3, 40)),
    "resnet18": ({"num_classes": 100, "width": 4}, (2, 3, 32, 32)),
    "vgg16_bn": ({"num_classes": 10, "width_div": 16}, (2, 3, 32, 32)),
    "wrn16_8": ({"num_classes": 10}, (2, 3, 32, 32)),
    "wrn28_10": ({"num_classes": 10}, (1, 3, 32, 32)),
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward(name: str) -> None:
    kwargs, shape = SMALL[name]
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    out = model(torch.randn(*shape))
    assert out.shape == (shape[0], kwargs["num_classes"])
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_resnet18_names_match_common_cifar_resnet() -> None:
    names = list(build_model("resnet18").state_dict())
    assert names[0] == "conv1.weight" and "linear.weight" in names and "linear.bias" in names
    for key in ("bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.running_var", "layer4.1.bn2.bias"):
        assert key in names
    assert sum(p.numel() for p in build_model("resnet18").parameters()) == 11_173_962  # as kuangliu/pytorch-cifar


def test_cnn1d_batchnorm_variant() -> None:
    model = build_model("cnn1d", batch_norm=True)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())


def test_bad_model_name_and_kwargs() -> None:
    with pytest.raises(FlatnessError, match="unknown model 'resnet50'"):
        build_model("resnet50")
    with pytest.raises(FlatnessError, match="does not take"):
        build_model("mlp", colour="red")


def test_user_model_by_callable_spec(tmp_path) -> None:  # noqa: ANN001
    from flatness.models import default_model_kwargs

    (tmp_path / "net.py").write_text(
        "from torch import nn\n\nclass Net(nn.Sequential):\n    def __init__(self, width=3):\n        super().__init__(nn.Linear(2, width))\n\n"
        "def not_a_model():\n    return 'model'\n"
    )
    model = build_model(f"{tmp_path / 'net.py'}:Net", width=5)  # a class is a callable too
    assert isinstance(model, torch.nn.Module) and model[0].out_features == 5
    assert default_model_kwargs(f"{tmp_path / 'net.py'}:Net", 10, (2,)) == {}  # the user's kwargs only
    with pytest.raises(FlatnessError, match=r"does not take these arguments \{'depth': 2\}"):
        build_model(f"{tmp_path / 'net.py'}:Net", depth=2)
    with pytest.raises(FlatnessError, match="returned str, expected a torch.nn.Module"):
        build_model(f"{tmp_path / 'net.py'}:not_a_model")
    with pytest.raises(FlatnessError, match="no such file"):
        build_model(f"{tmp_path / 'gone.py'}:Net")
