"""Name -> constructor table for the built-in models, and the user's own models by callable spec.

``build_model("cnn1d", in_features=40, num_classes=10)`` builds a registry
model; ``build_model("mymod.py:build", width=8)`` imports ``build`` from the
user's file (or ``package.module:build`` from ``sys.path``) and calls it with
the keyword arguments; it must return an ``nn.Module``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from flatness.errors import FlatnessError
from flatness.hooks import call_with_kwargs, is_callable_spec, load_callable


def _mlp(**kw: Any) -> nn.Module:
    from flatness.models.mlp import MLP

    return MLP(**kw)


def _cnn1d(**kw: Any) -> nn.Module:
    from flatness.models.cnn1d import CNN1D

    return CNN1D(**kw)


def _resnet18(**kw: Any) -> nn.Module:
    from flatness.models.resnet import resnet18

    return resnet18(**kw)


def _vgg16_bn(**kw: Any) -> nn.Module:
    from flatness.models.vgg import vgg16_bn

    return vgg16_bn(**kw)


def _wrn16_8(**kw: Any) -> nn.Module:
    from flatness.models.wrn import WideResNet

    return WideResNet(depth=16, widen_factor=8, **kw)


def _wrn28_10(**kw: Any) -> nn.Module:
    from flatness.models.wrn import WideResNet

    return WideResNet(depth=28, widen_factor=10, **kw)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "cnn1d": _cnn1d,
    "resnet18": _resnet18,
    "vgg16_bn": _vgg16_bn,
    "wrn16_8": _wrn16_8,
    "wrn28_10": _wrn28_10,
}
MODEL_NAMES = tuple(_BUILDERS)

# Keyword arguments a registry model cannot take: ``name`` is the model's own
# name (build_model's first argument); a WideResNet's depth and width are its name.
_RESERVED: dict[str, tuple[str, ...]] = {
    "wrn16_8": ("name", "depth", "widen_factor"),
    "wrn28_10": ("name", "depth", "widen_factor"),
}

# Models that take MNIST-1D-shaped input (N, 40); the others take (N, 3, 32, 32).
SEQUENCE_MODELS = ("mlp", "cnn1d")


def default_model_kwargs(name: str, num_classes: int | None, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """The kwargs a model gets for a dataset when the user gives none (none for the user's own models)."""
    if is_callable_spec(name):
        return {}
    if num_classes is None and name in _BUILDERS:
        raise FlatnessError(f"model {name!r} is a classifier, but the data have no integer class labels; use your own model (--model module:callable)")
    if name in SEQUENCE_MODELS:
        if len(input_shape) != 1:
            raise FlatnessError(f"model {name!r} takes 1-D inputs, but the data have shape {input_shape}")
        return {"in_features": int(input_shape[0]), "num_classes": num_classes}
    if name in _BUILDERS:
        if tuple(input_shape) != (3, 32, 32):
            raise FlatnessError(f"model {name!r} takes 3x32x32 images, but the data have shape {input_shape}")
        return {"num_classes": num_classes}
    raise FlatnessError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")


def build_model(name: str, /, **kwargs: Any) -> nn.Module:
    """Build a model by registry name or callable spec, with keyword arguments.

    Args:
        name: one of :data:`MODEL_NAMES`, or ``package.module:fn`` /
            ``path/file.py:fn`` naming a callable (a class or a function)
            that returns an ``nn.Module``. Positional only, so that a user's
            callable may itself take a ``name`` keyword.
        **kwargs: passed to the constructor.

    Raises:
        FlatnessError: unknown name, a callable that cannot be imported or
            does not return an ``nn.Module``, a reserved keyword for a
            registry model (``name``; a WideResNet's ``depth`` and
            ``widen_factor``), or kwargs the model does not take.
    """
    if is_callable_spec(name):
        return _build_user_model(name, kwargs)
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise FlatnessError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}") from None
    for key in _RESERVED.get(name, ("name",)):
        if key in kwargs:
            raise FlatnessError(
                f"model kwargs may not set {key!r} for model {name!r}: "
                + ("the model is chosen by its name (--model), not by a keyword" if key == "name" else f"{name!r} fixes it")
            )
    try:
        return builder(**kwargs)
    except TypeError as e:
        raise FlatnessError(f"model {name!r} does not take these arguments {kwargs}: {e}") from None


def _build_user_model(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    model = call_with_kwargs(load_callable(spec), spec, kwargs, "model")
    if not isinstance(model, nn.Module):
        raise FlatnessError(f"model {spec!r} returned {type(model).__qualname__}, expected a torch.nn.Module")
    return model
