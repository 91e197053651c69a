"""sasa: Stand-Alone Self-Attention in Vision Models (Ramachandran et al., NeurIPS 2019) for PyTorch.

Public surface: the functional op ``local_attention_2d`` and ``available_backends``; the layers
``SelfAttention2d`` and ``AttentionStem``; the model registry ``create_model`` / ``list_models``; FLOP
accounting ``count_flops``. See ``../shared/SPEC.md`` (shipped as docs) for the maths and decisions.
"""

from .functional import available_backends, local_attention_2d

__version__ = "0.1.0"

__all__ = ["available_backends", "local_attention_2d", "__version__"]
