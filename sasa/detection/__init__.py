"""Detection: RetinaNet with SASA backbones and attention FPN/heads, COCO data, training and evaluation.

Paper: Ramachandran et al., "Stand-Alone Self-Attention in Vision Models", NeurIPS 2019, section 4.2 (SPEC
section 4). ``create_detector`` returns a torchvision ``RetinaNet``; the backbone comes from ``sasa.models``.

Status: builders, attention FPN/heads, COCO data, COCOeval, training/eval loops and drawing complete; the paper's
COCO numbers are not reproduced here (150 epochs at batch 64 need a GPU cluster).
"""

from .heads import AttentionP6P7, AttentionRetinaNetHead, attention_fpn_
from .retinanet import DETECTORS, create_detector, detector_flops, detector_from_name, detector_table

__all__ = [
    "DETECTORS",
    "AttentionP6P7",
    "AttentionRetinaNetHead",
    "attention_fpn_",
    "create_detector",
    "detector_flops",
    "detector_from_name",
    "detector_table",
]
