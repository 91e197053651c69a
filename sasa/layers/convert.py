"""``convert_to_attention``: swap the spatial convolutions of any ``nn.Module`` for SASA layers, in place.

The paper (arXiv 1906.05909) replaces every spatial convolution of a ResNet with local self-attention; this does it
to any model (torchvision's and timm's ResNets, the ``sasa`` baselines). torchvision's ``resnet50`` with the defaults
becomes exactly ``sasa_resnet50_convstem`` (18.02M parameters). Replaced: every ``nn.Conv2d`` with a kernel above
1x1, ``groups == 1``, ``in_channels >= min_channels`` and a name selected by ``stages``, by
``SelfAttention2d(in, out, k, stride, heads)`` (stride > 1: attention + average pool); the new layer takes the old
one's device, dtype and mode.

Decisions the paper leaves open:
- ``min_channels=16`` keeps an RGB or grayscale stem a convolution (the "conv-stem" models); 1 converts it too.
- Biases are dropped (SASA layers have none; here a norm follows), with a warning naming the convolutions.
- Dilation is ignored (the window is a dense k x k); padding must be "same" (or timm's ``Conv2dSame``), and the
  attention's own ``padding`` replaces the padding mode.
- Convolutions that match but cannot become attention (non-square, padding not "same", ``out_channels`` not
  divisible by ``heads``, odd head_dim): ``strict=True`` raises one ``ValueError`` naming all; ``strict=False``
  keeps them and warns. Layers inside a ``SelfAttention2d`` or ``AttentionStem`` are never touched.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

from torch import nn

from .attention import SelfAttention2d
from .stem import AttentionStem

StageFilter = Callable[[str, nn.Conv2d], bool]


def _stage_filter(stages) -> StageFilter:
    """Normalise ``stages`` (None, name prefixes, stage numbers or a predicate) to a predicate."""
    if stages is None:
        return lambda name, conv: True
    if callable(stages):
        return stages
    items = [stages] if isinstance(stages, (str, int)) else list(stages)
    prefixes = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise TypeError(f"stages must hold module-name prefixes (str) or stage numbers (int), got {item!r}")
        prefixes.append(f"layer{item}" if isinstance(item, int) else item)
    return lambda name, conv: any(name == p or name.startswith(p + ".") for p in prefixes)


def _why_not(conv: nn.Conv2d, heads: int, positional: str) -> str | None:
    """``None`` when ``conv`` can become a SelfAttention2d, else the reason it cannot."""
    kh, kw = conv.kernel_size
    if kh != kw:
        return f"non-square kernel {conv.kernel_size}"
    if conv.stride[0] != conv.stride[1]:
        return f"non-square stride {conv.stride}"
    same_padding = tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    if type(conv).__name__ != "Conv2dSame" and conv.padding not in ("same", same_padding):  # timm's dynamic "same"
        return f"padding {conv.padding!r} changes the output size (expected {same_padding} or 'same')"
    if conv.out_channels % heads:
        return f"out_channels={conv.out_channels} is not divisible by heads={heads}"
    if positional == "relative" and (conv.out_channels // heads) % 2:
        return f"head_dim={conv.out_channels // heads} (out_channels / heads) must be even for relative embeddings"
    return None


def convert_to_attention(model: nn.Module, kernel_size: int = 7, heads: int = 8, *, min_channels: int = 16,
                         stages: None | str | int | Iterable[str | int] | StageFilter = None, strict: bool = True,
                         **attention) -> int:
    """Replace the spatial convolutions of ``model`` with ``SelfAttention2d`` layers, in place; returns how many.

    Args:
        model: any module, e.g. ``torchvision.models.resnet50()`` or ``timm.create_model("resnet26")``.
        kernel_size: attention window of every new layer (odd; the paper uses 7 whatever the conv's kernel was).
        heads: attention heads of every new layer (the paper uses 8).
        min_channels: convolutions with fewer input channels are kept (the RGB stem with the default 16).
        stages: which convolutions may be replaced: ``None`` for all; module-name prefixes such as
            ``("layer3", "layer4")`` (a prefix matches itself and its children); ints ``n`` as shorthand for
            ``"layer{n}"`` (torchvision / timm / sasa stage names); or a predicate ``(name, conv) -> bool``.
        strict: raise (default) or, when ``False``, warn and keep the convolutions that pass the filters but cannot
            become attention (see the module docstring).
        **attention: further ``SelfAttention2d`` options: ``padding``, ``positional``, ``query_key``,
            ``rel_per_head``, ``scale``, ``backend``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Conv2d):
        raise TypeError("model is itself an nn.Conv2d and cannot be replaced in place; build a "
                        "SelfAttention2d directly or wrap the convolution in a container")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be a positive int, got {min_channels!r}")
    selected = _stage_filter(stages)
    positional = attention.get("positional", "relative")

    protected = set()  # submodules of existing attention layers are never converted
    for m in model.modules():
        if isinstance(m, (SelfAttention2d, AttentionStem)):
            protected.update(id(sub) for sub in m.modules() if sub is not m)

    todo, rejected = [], []
    for parent_name, parent in model.named_modules():
        for child_name, conv in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if (not isinstance(conv, nn.Conv2d) or id(conv) in protected or conv.groups != 1
                    or max(conv.kernel_size) == 1 or conv.in_channels < min_channels or not selected(name, conv)):
                continue
            reason = _why_not(conv, heads, positional)
            if reason is None:
                todo.append((parent, child_name, name, conv))
            else:
                rejected.append(f"{name} ({reason})")
    if rejected:
        msg = (f"{len(rejected)} convolution(s) cannot become SelfAttention2d(kernel_size={kernel_size}, "
               f"heads={heads}): " + "; ".join(rejected))
        if strict:
            raise ValueError(msg + ". Pass strict=False to keep them as convolutions, or exclude them with stages= "
                             "or min_channels=")
        warnings.warn(msg + "; kept as convolutions (strict=False)", stacklevel=2)

    new: dict[int, SelfAttention2d] = {}  # a convolution shared by two parents stays shared
    dropped_bias = []
    for parent, child_name, name, conv in todo:
        if id(conv) not in new:
            layer = SelfAttention2d(conv.in_channels, conv.out_channels, kernel_size, stride=conv.stride[0],
                                    heads=heads, **attention)
            new[id(conv)] = layer.to(device=conv.weight.device, dtype=conv.weight.dtype).train(conv.training)
            if conv.bias is not None:
                dropped_bias.append(name)
        setattr(parent, child_name, new[id(conv)])
    if dropped_bias:
        warnings.warn(f"SelfAttention2d has no bias; dropped the bias of {len(dropped_bias)} convolution(s): "
                      + ", ".join(dropped_bias), stacklevel=2)
    return len(new)
