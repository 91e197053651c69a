"""sasa: Stand-Alone Self-Attention in Vision Models (Ramachandran et al., NeurIPS 2019) for PyTorch.

Public surface: the functional op ``local_attention_2d`` and ``available_backends``; the layers
``SelfAttention2d`` and ``AttentionStem``; the model registry ``create_model`` / ``list_models``; FLOP
accounting ``count_flops``; ``convert_to_attention`` (swap any model's spatial convolutions for SASA layers) and
``attention_maps`` (what the attention layers look at). When timm is installed the ``sasa_*`` models are registered
with it (lazily, see ``sasa/timm_compat.py``). The maths and the decisions the paper leaves open are in
``docs/SPEC.md``."""

from .flops import count_flops, count_params
from .functional import available_backends, local_attention_2d
from .layers import AttentionStem, SelfAttention2d
from .layers.convert import convert_to_attention
from .models import create_model, list_models
from .timm_compat import register_when_timm_imported
from .version import __version__
from .viz.maps import attention_maps

register_when_timm_imported()

__all__ = [
    "AttentionStem",
    "SelfAttention2d",
    "__version__",
    "attention_maps",
    "available_backends",
    "convert_to_attention",
    "count_flops",
    "count_params",
    "create_model",
    "list_models",
    "local_attention_2d",
]
