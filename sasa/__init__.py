"""sasa: Stand-Alone Self-Attention in Vision Models (Ramachandran et al., NeurIPS 2019) for PyTorch.

Public surface: the functional op ``local_attention_2d`` and ``available_backends``; the layers
``SelfAttention2d`` and ``AttentionStem``; the model registry ``create_model`` / ``list_models``; FLOP
accounting ``count_flops``. The maths and the decisions the paper leaves open are in ``docs/SPEC.md``.

Status: op, layers, models, accounting complete.
"""

from .flops import count_flops, count_params
from .functional import available_backends, local_attention_2d
from .layers import AttentionStem, SelfAttention2d
from .models import create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "AttentionStem",
    "SelfAttention2d",
    "__version__",
    "available_backends",
    "count_flops",
    "count_params",
    "create_model",
    "list_models",
    "local_attention_2d",
]
