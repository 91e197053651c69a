"""Attention FPN and attention class/box heads for torchvision's RetinaNet (SPEC section 4, the paper's Table 2).

Every 3x3 convolution of width 256 in the FPN and the class and box subnets becomes a ``SelfAttention2d`` (k=7, 8
heads); strided ones (P6, P7) become attention + 2x2 average pool. torchvision's classes keep their forward, losses,
anchor matching and state-dict layout: ``attention_fpn_`` swaps a ``FeaturePyramidNetwork``'s 3x3 ``layer_blocks``
in place; ``AttentionP6P7`` is ``LastLevelP6P7`` from P5 (``ceil_mode`` pools, so odd maps get the strided conv's
sizes); ``AttentionClassificationHead`` / ``AttentionRegressionHead`` have an attention + ReLU tower, then a 1x1
convolution + ReLU mixing the heads' channels (SASA layers have no output projection), then RetinaNet's prediction
layer and init (N(0, 0.01); the focal-loss prior bias).

Our reading where SPEC section 4 is terse: the "1x1 conv at the end of each head" is an extra layer after the tower
and the predictor stays a 3x3 convolution; ``predictor_kernel_size=1`` gives the other reading (19.6M parameters
for the full-size model instead of 21.3M, against the paper's 22.0M).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torchvision.models.detection.retinanet import (
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
)
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from ..layers.attention import SelfAttention2d

VALUE_INIT_STD = 0.01


def attention_layer(channels: int, *, kernel_size: int = 7, heads: int = 8, stride: int = 1,
                    value_std: float | None = None) -> SelfAttention2d:
    """A width-preserving ``SelfAttention2d``; ``stride=2`` pools 2x2 with ``ceil_mode`` (conv-like output size);
    ``value_std`` re-initialises the value projection from N(0, value_std)."""
    layer = SelfAttention2d(channels, channels, kernel_size=kernel_size, stride=stride, heads=heads)
    if stride > 1:
        layer.pool = nn.AvgPool2d(stride, stride, ceil_mode=True)
    if value_std is not None:
        with torch.no_grad():
            layer.value_weight.normal_(0.0, value_std)  # a view into the fused qkv weight
    return layer


def attention_fpn_(fpn: FeaturePyramidNetwork, *, kernel_size: int = 7, heads: int = 8) -> FeaturePyramidNetwork:
    """Replace ``fpn``'s 3x3 output convolutions by attention layers, in place, and return ``fpn``."""
    if not isinstance(fpn, FeaturePyramidNetwork):
        raise TypeError(f"fpn must be a torchvision FeaturePyramidNetwork, got {type(fpn).__name__}")
    blocks = []
    for block in fpn.layer_blocks:
        conv = block[0] if isinstance(block, nn.Sequential) else block
        if conv.in_channels != conv.out_channels:
            raise ValueError(f"FPN output convolutions must keep the width, got {conv.in_channels} -> "
                             f"{conv.out_channels}")
        blocks.append(attention_layer(conv.out_channels, kernel_size=kernel_size, heads=heads))
    fpn.layer_blocks = nn.ModuleList(blocks)
    return fpn


class AttentionP6P7(LastLevelP6P7):
    """RetinaNet's extra levels P6 = attn/2(P5) and P7 = attn/2(ReLU(P6)), as torchvision's ``LastLevelP6P7``."""

    def __init__(self, channels: int, *, kernel_size: int = 7, heads: int = 8) -> None:
        super().__init__(channels, channels)  # use_P5 = True, as torchvision's retinanet_resnet50_fpn
        self.p6 = attention_layer(channels, kernel_size=kernel_size, heads=heads, stride=2)
        self.p7 = attention_layer(channels, kernel_size=kernel_size, heads=heads, stride=2)


def attention_tower(channels: int, *, depth: int = 4, kernel_size: int = 7, heads: int = 8,
                    norm_layer: Callable[[int], nn.Module] | None = None) -> nn.Sequential:
    """``depth`` x (attention [+ norm] + ReLU), then the 1x1 conv + ReLU that mixes the attention heads."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers.append(attention_layer(channels, kernel_size=kernel_size, heads=heads, value_std=VALUE_INIT_STD))
        if norm_layer is not None:
            layers.append(norm_layer(channels))
        layers.append(nn.ReLU())  # not in place: the attention output is a view of a custom autograd op
    mix = nn.Conv2d(channels, channels, 1)
    nn.init.normal_(mix.weight, std=0.01)
    nn.init.zeros_(mix.bias)
    layers += [mix, nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _predictor(channels: int, outputs: int, kernel_size: int, bias: float) -> nn.Conv2d:
    conv = nn.Conv2d(channels, outputs, kernel_size, padding=kernel_size // 2)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, bias)
    return conv


def _check_predictor_kernel(predictor_kernel_size: int) -> None:
    if predictor_kernel_size not in (1, 3):
        raise ValueError(f"predictor_kernel_size must be 1 or 3, got {predictor_kernel_size!r}")


class AttentionClassificationHead(RetinaNetClassificationHead):
    """torchvision's RetinaNet class subnet with an attention tower (forward and focal loss are torchvision's).

    Args:
        num_classes: object classes (no background class: sigmoid focal loss).
        prior_probability: initial foreground probability of the classifier bias.
        kernel_size, heads: attention window and heads.
        predictor_kernel_size: 3 (RetinaNet's prediction conv, default) or 1.
        norm_layer: optional normalisation after each attention layer (none in RetinaNet v1).
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, prior_probability: float = 0.01, *,
                 kernel_size: int = 7, heads: int = 8, predictor_kernel_size: int = 3,
                 norm_layer: Callable[[int], nn.Module] | None = None) -> None:
        _check_predictor_kernel(predictor_kernel_size)
        super().__init__(in_channels, num_anchors, num_classes, prior_probability)
        self.conv = attention_tower(in_channels, kernel_size=kernel_size, heads=heads, norm_layer=norm_layer)
        if predictor_kernel_size != 3:
            prior = -math.log((1 - prior_probability) / prior_probability)
            self.cls_logits = _predictor(in_channels, num_anchors * num_classes, predictor_kernel_size, prior)


class AttentionRegressionHead(RetinaNetRegressionHead):
    """torchvision's RetinaNet box subnet with an attention tower (forward and L1 box loss are torchvision's);
    arguments as ``AttentionClassificationHead``'s."""

    def __init__(self, in_channels: int, num_anchors: int, *, kernel_size: int = 7, heads: int = 8,
                 predictor_kernel_size: int = 3, norm_layer: Callable[[int], nn.Module] | None = None) -> None:
        _check_predictor_kernel(predictor_kernel_size)
        super().__init__(in_channels, num_anchors)
        self.conv = attention_tower(in_channels, kernel_size=kernel_size, heads=heads, norm_layer=norm_layer)
        if predictor_kernel_size != 3:
            self.bbox_reg = _predictor(in_channels, num_anchors * 4, predictor_kernel_size, 0.0)


class AttentionRetinaNetHead(RetinaNetHead):
    """``RetinaNetHead`` (``classification_head`` + ``regression_head``, torchvision's ``compute_loss``) with
    attention subnets. Args as ``AttentionClassificationHead``."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, *, kernel_size: int = 7,
                 heads: int = 8, predictor_kernel_size: int = 3,
                 norm_layer: Callable[[int], nn.Module] | None = None) -> None:
        nn.Module.__init__(self)  # RetinaNetHead.__init__ would only build the conv subnets we replace
        opts = {"kernel_size": kernel_size, "heads": heads, "predictor_kernel_size": predictor_kernel_size,
                    "norm_layer": norm_layer}
        self.classification_head = AttentionClassificationHead(in_channels, num_anchors, num_classes, **opts)
        self.regression_head = AttentionRegressionHead(in_channels, num_anchors, **opts)
