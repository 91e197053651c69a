"""Models: the ResNet family with SASA attention and the registry."""

from .registry import MODEL_INFO, create_model, list_models, register_model
from .resnet import Bottleneck, ResNet

__all__ = ["MODEL_INFO", "Bottleneck", "ResNet", "create_model", "list_models", "register_model"]
