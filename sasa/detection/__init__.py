"""Detection: RetinaNet with SASA backbones and attention FPN/heads, COCO data, training and evaluation.

Paper: Ramachandran et al., "Stand-Alone Self-Attention in Vision Models", NeurIPS 2019, section 4.2 (SPEC
section 4). ``create_detector`` returns a torchvision ``RetinaNet``; the backbone comes from ``sasa.models``."""

import importlib

_EXPORTS = {"DETECTORS": "config", "AttentionP6P7": "heads", "AttentionRetinaNetHead": "heads",
            "attention_fpn_": "heads", "create_detector": "retinanet", "detector_flops": "retinanet",
            "detector_from_name": "retinanet", "detector_table": "retinanet"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Imported on first use, so ``sasa --help`` (which builds ``detect-train``'s flags from ``config``) stays
    without torchvision's detection models."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
