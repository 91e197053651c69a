"""Visualisation: what SASA layers attend to.

``maps.py`` (torch only, exported as ``sasa.attention_maps``) captures the softmax weights of any
``SelfAttention2d`` layer; ``plot.py`` (matplotlib) draws them over the input image; ``show.py`` is the
``sasa show-attention`` pipeline (model, weights, image, layer and pixel choice). Only ``maps`` is imported here, so
``import sasa`` never imports matplotlib."""

from .maps import attention_layers, attention_maps

__all__ = ["attention_layers", "attention_maps"]
