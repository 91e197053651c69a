"""RetinaNet builders for SPEC section 4 (the paper's Table 2): ``sasa.models`` backbones x conv or attention heads.

Everything is torchvision's: a registered ``sasa.models`` ResNet (imported, never copied) in the public
``BackboneWithFPN`` (C3-C5 -> P3-P5, ``LastLevelP6P7`` from P5 as ``retinanet_resnet50_fpn`` v1), ``RetinaNet`` for
anchors, matching, losses, transform and post-processing; ``heads="attention"`` swaps in ``sasa.detection.heads``.
With ``weights_backbone`` (a ``sasa train`` ImageNet checkpoint) the backbone has ``FrozenBatchNorm2d`` and trains
its last 3 stages, without it ``BatchNorm2d`` and all 5; images are resized to the paper's 640 px.

``detector_table`` (``sasa info --detection``) counts parameters and FLOPs (``count_flops``) through backbone, FPN
and heads on one 640 x 640 input (the paper's crop; it does not state its size), without resize, anchors and NMS.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from ..flops import count_flops, count_params
from ..info import diff
from ..io.checkpoint import CheckpointError, load_state_dict_checked, read_weights
from ..models import create_model, list_models
from .config import DETECTORS
from .heads import AttentionP6P7, AttentionRetinaNetHead, attention_fpn_

HEADS = ("conv", "attention")

BACKBONE_LABELS = {"resnet50": "baseline", "sasa_resnet50_convstem": "conv-stem + attention",
                   "sasa_resnet50": "full attention"}


def _trainable_layers(trainable_backbone_layers: int | None, pretrained: bool) -> int:
    """torchvision's rule: 3 by default with pretrained weights, always 5 (with a warning) without."""
    if trainable_backbone_layers is not None and not 0 <= trainable_backbone_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be in [0, 5], got {trainable_backbone_layers}")
    if not pretrained:
        if trainable_backbone_layers not in (None, 5):
            warnings.warn(f"trainable_backbone_layers={trainable_backbone_layers} has no effect without "
                          "weights_backbone; training all 5 (as torchvision does)", stacklevel=3)
        return 5
    return 3 if trainable_backbone_layers is None else trainable_backbone_layers


def freeze_backbone_(backbone: nn.Module, trainable_layers: int) -> None:
    """Freeze all but the last ``trainable_layers`` of conv1, layer1..layer4 (torchvision's rule, bn1 with 5)."""
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        train.append("bn1")
    for name, param in backbone.named_parameters():
        if not any(name.startswith(prefix) for prefix in train):
            param.requires_grad_(False)


def load_backbone_weights_(backbone: nn.Module, path: str | os.PathLike, *, name: str) -> None:
    """Load ``sasa train``'s ImageNet weights at ``path`` (anything ``read_weights`` reads) into the ``sasa.models``
    ResNet ``backbone`` registered as ``name`` (checked against ``meta['model']``), in place. The classifier
    (``fc.*``) is ignored; any other missing, unexpected or mis-shaped key raises ``CheckpointError``."""
    state, meta = read_weights(path)
    source = f"backbone weights {str(path)!r}"
    if meta.get("model") not in (None, name):
        raise CheckpointError(f"{source} were trained for model {meta['model']!r}, but backbone={name!r}")
    own = backbone.state_dict()
    clean = {k: v for k, v in state.items()
             if not k.startswith("fc.") and (k in own or not k.endswith("num_batches_tracked"))}
    clean.update({k: v for k, v in own.items() if k.startswith("fc.")})
    load_state_dict_checked(backbone, clean, source=f"{source} (for backbone {name!r})")


def create_detector(backbone: str = "resnet50", heads: str = "conv", num_classes: int = 80, *,
                    weights_backbone: str | os.PathLike | None = None, trainable_backbone_layers: int | None = None,
                    frozen_bn: bool | None = None, fpn_channels: int = 256, returned_layers: Sequence[int] = (2, 3, 4),
                    attention_kernel_size: int = 7, attention_heads: int = 8, predictor_kernel_size: int = 3,
                    backbone_overrides: dict | None = None, **kwargs) -> RetinaNet:
    """A torchvision ``RetinaNet`` on a ``sasa.models`` backbone with conv or attention FPN + heads.

    Args:
        backbone: any registered model name; the paper's rows use ``"resnet50"``, ``"sasa_resnet50_convstem"``
            and ``"sasa_resnet50"``; the tiny ``"test_resnet"`` / ``"test_sasa_resnet"`` serve the tests.
        heads: ``"conv"`` (RetinaNet's) or ``"attention"`` (attention FPN, P6/P7 and class/box subnets).
        num_classes: object classes (sigmoid focal loss: no background class; 80 for COCO).
        weights_backbone: an ImageNet checkpoint of ``sasa train`` (``.safetensors`` or a dict with ``'model'``).
        trainable_backbone_layers: 0-5 trainable stages from the top; torchvision's defaults.
        frozen_bn: ``FrozenBatchNorm2d`` in the backbone; default: True with ``weights_backbone``, else False.
        fpn_channels: FPN and head width (256 in the paper).
        returned_layers: backbone stages feeding the FPN (2, 3, 4 -> P3-P5, then P6, P7).
        attention_kernel_size, attention_heads: window and heads of the attention FPN/heads (7, 8).
        predictor_kernel_size: prediction layer of the attention heads, 3 (default) or 1 (see ``heads``).
        backbone_overrides: extra ``sasa.models.create_model`` overrides (e.g. ``{"kernel_size": 5}``).
        **kwargs: ``torchvision.models.detection.RetinaNet`` arguments (``min_size``, ``max_size``,
            ``anchor_generator``, ``score_thresh``, ``detections_per_img``, ...).
    """
    if backbone not in list_models():
        raise ValueError(f"backbone must be a registered model, got {backbone!r}; valid: {', '.join(list_models())}")
    if heads not in HEADS:
        raise ValueError(f"heads must be one of {HEADS}, got {heads!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    returned_layers = tuple(returned_layers)
    if not returned_layers or any(k not in (1, 2, 3, 4) for k in returned_layers):
        raise ValueError(f"returned_layers must be drawn from (1, 2, 3, 4), got {returned_layers!r}")
    if heads == "attention" and "head" in kwargs:
        raise ValueError("heads='attention' builds its own head; do not pass head=")
    pretrained = weights_backbone is not None
    trainable = _trainable_layers(trainable_backbone_layers, pretrained)
    frozen = pretrained if frozen_bn is None else bool(frozen_bn)
    norm_layer = FrozenBatchNorm2d if frozen else nn.BatchNorm2d
    body = create_model(backbone, num_classes=1000, norm_layer=norm_layer, **(backbone_overrides or {}))
    if pretrained:
        load_backbone_weights_(body, weights_backbone, name=backbone)
    freeze_backbone_(body, trainable)

    in_channels = [getattr(body, f"layer{k}")[-1].conv3.out_channels for k in returned_layers]
    return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned_layers)}
    if heads == "attention":
        extra = AttentionP6P7(fpn_channels, kernel_size=attention_kernel_size, heads=attention_heads)
    else:
        extra = LastLevelP6P7(fpn_channels, fpn_channels)
    fpn_backbone = BackboneWithFPN(body, return_layers, in_channels, fpn_channels, extra_blocks=extra)
    if heads == "attention":
        attention_fpn_(fpn_backbone.fpn, kernel_size=attention_kernel_size, heads=attention_heads)

    kwargs.setdefault("min_size", 640)
    kwargs.setdefault("max_size", 640)
    model = RetinaNet(fpn_backbone, num_classes, **kwargs)
    if heads == "attention":
        model.head = AttentionRetinaNetHead(fpn_channels, model.anchor_generator.num_anchors_per_location()[0],
                                            num_classes, kernel_size=attention_kernel_size, heads=attention_heads,
                                            predictor_kernel_size=predictor_kernel_size)
    return model


def detector_from_name(name: str, num_classes: int = 80, **kwargs) -> RetinaNet:
    """One of SPEC section 4's five rows by name (``list(DETECTORS)``)."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; valid: {', '.join(DETECTORS)}")
    cfg = DETECTORS[name]
    return create_detector(cfg["backbone"], cfg["heads"], num_classes, **kwargs)


class _DenseForward(nn.Module):
    """Backbone + FPN + heads of a RetinaNet on an already-normalised batch (what the FLOP count measures)."""

    def __init__(self, detector: RetinaNet) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = list(self.detector.backbone(x).values())  # P3..P7, (B, C, H / 2**l, W / 2**l)
        return self.detector.head(features)


def detector_flops(model: RetinaNet, image_size: int | tuple[int, int] = 640) -> int:
    """FLOPs (2 per multiply-add) of backbone, FPN and heads on one ``image_size`` image (see module docstring)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return count_flops(_DenseForward(model), (1, 3, h, w))


def detector_table(*, image_size: int = 640, num_classes: int = 80, flops: bool = True) -> str:
    """SPEC section 4's five rows: our params (M) and GFLOPs, each beside the paper's printed figure and the
    difference (ours - paper), and the paper's mAP."""
    header = (f"{'FPN + heads':<11} {'backbone':<22} {'params (M)':>10} {'paper':>6} {'diff':>6} {'GFLOPs':>7} "
              f"{'paper':>6} {'diff':>6} {'paper mAP':>9}")
    lines = [header, "-" * len(header)]
    for cfg in DETECTORS.values():
        model = create_detector(cfg["backbone"], cfg["heads"], num_classes)
        params = count_params(model) / 1e6
        p_gflops, p_params, p_map = cfg["paper"][:3]
        gflops = detector_flops(model, image_size) / 1e9 if flops else None
        flop_cols = f"{gflops:>7.1f} {p_gflops:>6} {diff(gflops, p_gflops, 1):>6}" if flops else \
            f"{'-':>7} {p_gflops:>6} {'-':>6}"
        lines.append(f"{cfg['heads']:<11} {BACKBONE_LABELS.get(cfg['backbone'], cfg['backbone']):<22} "
                     f"{params:>10.2f} {p_params:>6} {diff(params, p_params, 2):>6} {flop_cols} {p_map:>9}")
    lines.append(f"ours: {num_classes} classes, BN weights counted, GFLOPs at {image_size}x{image_size} (backbone + "
                 "FPN + heads, a multiply-add = 2)")
    lines.append("paper: Ramachandran et al. 2019, Table 2, as printed (COCO val; SPEC section 4); "
                 "diff = ours - paper; its FLOP image size is not stated")
    return "\n".join(lines)
