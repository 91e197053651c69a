"""Layers: ``SelfAttention2d`` (the SASA layer), ``AttentionStem``, position encodings."""

from .attention import SelfAttention2d
from .stem import AttentionStem

__all__ = ["AttentionStem", "SelfAttention2d"]
