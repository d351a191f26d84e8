"""Models by name: ``build_model("resnet18", num_classes=100)``."""

from flatness.models.registry import MODEL_NAMES, build_model, default_model_kwargs

__all__ = ["MODEL_NAMES", "build_model", "default_model_kwargs"]
