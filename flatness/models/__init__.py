"""Models by name, ``build_model("resnet18", num_classes=100)``, or your own, ``build_model("mymod.py:Net", width=64)``."""

from flatness.models.registry import MODEL_NAMES, build_model, default_model_kwargs

__all__ = ["MODEL_NAMES", "build_model", "default_model_kwargs"]
