"""Visualisation of what SASA layers attend to: ``maps`` (torch only, ``sasa.attention_maps``) captures the
weights, ``plot`` (matplotlib) draws them, ``show`` is ``sasa show-attention``. Only ``maps`` is imported here, so
``import sasa`` never imports matplotlib."""

from .maps import attention_layers, attention_maps

__all__ = ["attention_layers", "attention_maps"]
