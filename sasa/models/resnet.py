"""ResNet v1.5 bottleneck networks with SASA attention: baseline, conv-stem + attention, full attention.

One definition serves the paper's three variants and its ablations (SPEC section 3): ``attention_stages`` picks the
stages whose 3x3 convolutions become ``SelfAttention2d`` (strided ones: attention + 2x2 average pool); ``stem`` is
``"conv"`` (7x7/2 + max pool), ``"attention"`` (attention stem + 4x4/4 max pool) or ``"small"`` (3x3/1, no pool, for
28-32 px images; ours). torchvision's attribute contract is kept (``conv1``, ``bn1``, ``layer1..4``, ``fc``,
``norm_layer``), so ``BackboneWithFPN`` and ``RetinaNet`` take these models as they are. Stage widths are
``64 * width_multiplier * 2**i`` rounded to a multiple of ``2 * heads`` with attention (even head_dim) and of 8
otherwise: the paper's 64/128/256/512 at ``width_multiplier=1``.
"""

# no `from __future__ import annotations`: torch.fx copies forward's annotations into generated code, which
# TorchScript must then resolve (strings come out as unknown type names)
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.attention import SelfAttention2d
from ..layers.recompute import checkpoint_keeping_buffers
from ..layers.stem import AttentionStem

STEMS = ("conv", "attention", "small")
POOL_TYPES = ("avg", "max", "avgmax", "catavgmax", "")
NUM_FEATURES = 5  # feature taps: the stem activation, then layer1 .. layer4


def feature_take_indices(num_features: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """timm's convention for ``forward_intermediates(indices=)``: None takes every tap, an int n the last n, a
    sequence those taps (negative ones count from the end). Returns the taps and the largest of them."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"indices={indices}: expected 1 .. {num_features} (the last n feature taps)")
        take = [num_features - indices + i for i in range(indices)]
    else:
        take = [num_features + i if i < 0 else i for i in indices]
        if not take or any(not 0 <= i < num_features for i in take):
            raise ValueError(f"indices={list(indices)}: expected taps in [-{num_features}, {num_features})")
    return take, max(take)


def _check_batch(x: torch.Tensor, what: str) -> None:
    """A (B, C, H, W) batch, or a ``ValueError`` naming the shape received; under FX tracing (where the rank is a
    proxy) ``torch._assert``, which the traced graph keeps."""
    if isinstance(x, torch.fx.Proxy):
        torch._assert(x.dim() == 4, f"{what} expects a (B, C, H, W) batch")
    elif x.dim() != 4:
        raise ValueError(f"{what} expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")


class GlobalPool2d(nn.Module):
    """Head pooling ``(B, C, H, W) -> (B, C * feat_mult())`` as timm names it: ``"avg"``, ``"max"``, ``"avgmax"``
    (their mean), ``"catavgmax"`` (both, concatenated), or ``""`` (no pooling: the map passes through)."""

    def __init__(self, pool_type: str = "avg") -> None:
        super().__init__()
        if pool_type not in POOL_TYPES:
            raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {pool_type!r}")
        self.pool_type = pool_type

    def feat_mult(self) -> int:
        return 2 if self.pool_type == "catavgmax" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "":
            return x
        if self.pool_type == "max":
            return torch.flatten(F.adaptive_max_pool2d(x, 1), 1)
        avg = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        if self.pool_type == "avg":
            return avg
        mx = torch.flatten(F.adaptive_max_pool2d(x, 1), 1)
        return 0.5 * (avg + mx) if self.pool_type == "avgmax" else torch.cat((avg, mx), 1)

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}"


def make_divisible(value: float, divisor: int) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never below ``divisor`` nor 10% below value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class Bottleneck(nn.Module):
    """1x1 -> 3x3 conv or SASA layer (carrying the stride) -> 1x1, expansion 4, as torchvision's v1.5 block."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, *,
                 attention: dict | None = None, norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        if attention is None:
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        else:
            self.conv2 = SelfAttention2d(planes, planes, stride=stride, **attention)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with optional SASA attention (see the module docstring), with timm's model API: ``forward_features``
    (the unpooled ``(B, num_features, H/32, W/32)`` map), ``forward_head(x, pre_logits=False)``,
    ``forward_intermediates`` / ``prune_intermediate_layers`` over five taps (the stem activation ``relu``, then
    ``layer1..4``), ``get_classifier`` / ``reset_classifier``, ``set_grad_checkpointing`` (each stage recomputed in
    the backward), ``group_matcher`` and ``no_weight_decay`` (the relative tables and the stem's embeddings).

    Args:
        layers: bottleneck blocks per stage, e.g. ``(3, 4, 6, 3)`` for depth 50.
        num_classes: classifier outputs; 0 for no classifier (``forward`` returns the pooled features).
        global_pool: ``"avg"`` (default), ``"max"``, ``"avgmax"``, ``"catavgmax"`` or ``""`` (no pooling: ``forward``
            returns the feature map when ``num_classes=0``).
        in_chans: input image channels.
        attention_stages: 1-based stages whose 3x3 convolutions become attention; ``()`` for the conv baseline.
        kernel_size, heads, padding, positional, query_key, rel_per_head, scale, backend, recompute_qkv:
            ``SelfAttention2d`` options for every attention layer.
        stem: ``"conv"``, ``"attention"`` or ``"small"``.
        checkpoint_stem: in training, keep only the image for the backward and recompute the stem part (stem, BN,
            ReLU, pool) there (``torch.utils.checkpoint``; BN running statistics updated once). For the attention
            stem, whose BN / ReLU run at full resolution, this removes the largest activations of the model for one
            more stem forward per step. Not applied by torchvision's ``IntermediateLayerGetter`` (detection), which
            runs the children itself.
        stem_values: values of the attention stem, ``"spatial"``, ``"plain"`` or ``"conv"``.
        stem_mixtures: m, the number of value matrices of the spatially-aware stem.
        stem_backend: ``AttentionStem``'s ``backend`` (a stem backend name; None: the registry's choice).
        stem_relu: a ReLU between the stem's BN and its pool. None (default): the paper's choice, ReLU after the
            conv stems (ResNet's) and none after the attention stem (SPEC section 2: attention, BN, max pool).
            The ReLU has no parameters, so weights load either way.
        width_multiplier: scales every width.
        zero_init_residual: zero-init each block's last BN gamma (torchvision's option).
        norm_layer: normalisation constructor, ``nn.BatchNorm2d`` by default.
        drop_rate: dropout before the classifier.
    """

    def __init__(self, layers: Sequence[int], num_classes: int = 1000, *, in_chans: int = 3,
                 attention_stages: Sequence[int] = (), kernel_size: int = 7, heads: int = 8, padding: str = "zeros",
                 positional: str = "relative", query_key: bool = True, rel_per_head: bool = False,
                 scale: float = 1.0, backend: str | None = None, recompute_qkv: bool = False, stem: str = "conv",
                 stem_values: str = "spatial", stem_mixtures: int = 4, stem_backend: str | None = None,
                 checkpoint_stem: bool = False, stem_relu: bool | None = None,
                 width_multiplier: float = 1.0,
                 zero_init_residual: bool = False,
                 norm_layer: Callable[[int], nn.Module] | None = None, drop_rate: float = 0.0,
                 global_pool: str = "avg") -> None:
        super().__init__()
        if len(layers) != 4 or any((not isinstance(n, int)) or n < 1 for n in layers):
            raise ValueError(f"layers must be four positive ints (blocks per stage), got {layers!r}")
        attention_stages = tuple(attention_stages)
        bad = [s for s in attention_stages if s not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"attention_stages must be drawn from (1, 2, 3, 4), got {attention_stages!r}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if width_multiplier <= 0:
            raise ValueError(f"width_multiplier must be positive, got {width_multiplier}")
        norm_layer = norm_layer or nn.BatchNorm2d
        self._norm_layer = norm_layer
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no classifier), got {num_classes!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.grad_checkpointing = False
        self.attention_stages = attention_stages
        self.checkpoint_stem = bool(checkpoint_stem)
        divisor = 2 * heads if (attention_stages or stem == "attention") else 8
        widths = [make_divisible(64 * width_multiplier * 2**i, divisor) for i in range(4)]
        stem_width = make_divisible(64 * width_multiplier, divisor)
        self.inplanes = stem_width
        if stem == "conv":
            conv1, maxpool = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False), nn.MaxPool2d(3, 2, 1)
        elif stem == "attention":
            conv1 = AttentionStem(in_chans, stem_width, values=stem_values, mixtures=stem_mixtures,
                                  backend=stem_backend)
            maxpool = nn.MaxPool2d(4, stride=4)
        else:
            conv1, maxpool = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False), nn.Identity()
        # registered in forward order: torchvision's IntermediateLayerGetter (in BackboneWithFPN) runs the children
        # in registration order
        self.conv1 = conv1
        self.bn1 = norm_layer(stem_width)
        stem_relu = stem != "attention" if stem_relu is None else stem_relu
        self.relu = nn.ReLU(inplace=True) if stem_relu else nn.Identity()  # Identity keeps the attribute contract
        self.maxpool = maxpool
        attn = dict(kernel_size=kernel_size, heads=heads, padding=padding, positional=positional,
                    query_key=query_key, rel_per_head=rel_per_head, scale=scale, backend=backend,
                    recompute_qkv=recompute_qkv)
        for i, (blocks, width) in enumerate(zip(layers, widths)):
            stage = self._make_layer(width, blocks, stride=1 if i == 0 else 2,
                                     attention=attn if (i + 1) in attention_stages else None)
            setattr(self, f"layer{i + 1}", stage)
        self.num_features = widths[-1] * Bottleneck.expansion
        self.avgpool = GlobalPool2d(global_pool)  # torchvision's name for the head pooling
        self.head_hidden_size = self.num_features * self.avgpool.feat_mult()
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes else nn.Identity()
        self._init_weights(zero_init_residual)

    def _make_layer(self, planes: int, blocks: int, stride: int, attention: dict | None) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                norm_layer(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, attention=attention, norm_layer=norm_layer)]
        self.inplanes = planes * Bottleneck.expansion
        for _ in range(1, blocks):
            layers.append(Bottleneck(self.inplanes, planes, attention=attention, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # attention layers re-take their own init (projections, tables)
            if isinstance(m, SelfAttention2d):
                m.reset_parameters()
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """timm's parameter groups (layer-wise lr decay): the stem, then one group per stage (``coarse``) or block."""
        return dict(stem=r"^conv1|^bn1|^maxpool", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage in the backward instead of keeping its activations (BN statistics updated once)."""
        self.grad_checkpointing = bool(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters to train without weight decay beyond timm's rule (biases and 1-D tensors): the attention
        layers' relative-position tables and the attention stem's position and mixture embeddings (SPEC section 5)."""
        names = ("rel_rows", "rel_cols", "emb_row", "emb_col", "emb_mix")
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in names}

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier of ``num_classes`` outputs (0: none) on the parameters' device and dtype; ``global_pool``
        replaces the pooling (None keeps it)."""
        ref = next(self.parameters())
        self.num_classes = num_classes
        if global_pool is not None:
            self.avgpool = GlobalPool2d(global_pool).train(self.training)
        self.head_hidden_size = self.num_features * self.avgpool.feat_mult()
        self.fc = nn.Linear(self.head_hidden_size, num_classes, device=ref.device, dtype=ref.dtype) \
            if num_classes else nn.Identity()
        self.fc.train(self.training)

    def _stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not isinstance(x, torch.fx.Proxy):
            return checkpoint_keeping_buffers(stage, x, [stage])
        return stage(x)

    def _run_stages(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.layer4(self.layer3(self.layer2(self.layer1(x))))
        else:
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = self._stage(stage, x)
            return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> the unpooled last-stage map ``(B, num_features, H', W')``."""
        if not torch.jit.is_scripting() and self.checkpoint_stem and self.training and torch.is_grad_enabled():
            x = checkpoint_keeping_buffers(self._stem, x, [self.conv1, self.bn1])
        else:
            x = self._stem(x)
        return self._run_stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooling, dropout and classifier; ``pre_logits=True`` stops before the classifier."""
        x = self.drop(self.avgpool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            torch._assert(x.dim() == 4, "ResNet expects a (B, C, H, W) batch")
        else:
            _check_batch(x, "ResNet")
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature API: the last-stage map and the taps ``indices`` of (stem activation, layer1..4).

        Args:
            x: ``(B, C, H, W)`` batch.
            indices: None for all five taps, n for the last n, or a sequence of taps.
            norm: accepted for timm's interface; these models have no final norm.
            stop_early: stop after the last tap asked for (the returned map is then that tap's stage output).
            output_fmt: ``"NCHW"`` only.
            intermediates_only: return the taps alone.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: these models give NCHW maps only")
        _check_batch(x, "ResNet")
        take, last = feature_take_indices(NUM_FEATURES, indices)
        taps = []
        x = self.relu(self.bn1(self.conv1(x)))
        if 0 in take:
            taps.append(x)
        x = self.maxpool(x)
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        for i, stage in enumerate(stages[:last] if stop_early else stages, start=1):
            x = self._stage(stage, x)
            if i in take:
                taps.append(x)
        return taps if intermediates_only else (x, taps)

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last tap in ``indices`` (and the classifier when ``prune_head``); returns the
        taps as non-negative indices (timm's ``FeatureGetterNet`` calls this)."""
        take, last = feature_take_indices(NUM_FEATURES, indices)
        for i in range(last + 1, 5):
            setattr(self, f"layer{i}", nn.Sequential())
        if last == 0:
            self.maxpool = nn.Identity()
        if last < NUM_FEATURES - 1:  # the features now end at the last kept tap
            self.num_features = self.head_hidden_size = self.bn1.num_features if last == 0 else \
                getattr(self, f"layer{last}")[-1].conv3.out_channels
        if prune_head or last < NUM_FEATURES - 1:
            self.reset_classifier(0, "")
        return take
