"""``attention_maps``: the softmax weights of a model's ``SelfAttention2d`` layers for a batch of images.

Forward pre-hooks pass each selected layer's input to ``SelfAttention2d.attention_weights`` (the ``reference``
backend: the fast ones never materialise probabilities); the forward stops once every selected layer was seen.
Works for any module holding ``SelfAttention2d`` layers (sasa models, ``sasa.convert_to_attention``'s, timm's).
The attention stem is not covered: its block attention has no k x k window."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..layers.attention import SelfAttention2d

LayerSpec = str | int


def attention_layers(model: nn.Module) -> dict[str, SelfAttention2d]:
    """Every ``SelfAttention2d`` in ``model`` by module name, in registration order (forward order for ResNets)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SelfAttention2d)}


def resolve_layers(model: nn.Module, layers: LayerSpec | Iterable[LayerSpec] | None) -> list[str]:
    """Module names for ``layers``: ``None`` (all), a name, an index into ``attention_layers(model)``, or a list."""
    names = list(attention_layers(model))
    if not names:
        raise ValueError(f"model {type(model).__name__} has no SelfAttention2d layer")
    if layers is None:
        return names
    items = [layers] if isinstance(layers, (str, int)) else list(layers)
    chosen = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise TypeError(f"layers must hold module names (str) or indices (int), got {item!r}")
        if isinstance(item, int):
            if not -len(names) <= item < len(names):
                raise ValueError(f"layer index {item} is out of range: the model has {len(names)} attention layers "
                                 f"(valid: {-len(names)} .. {len(names) - 1})")
            item = names[item]
        elif item not in names:
            raise ValueError(f"layer {item!r} is not a SelfAttention2d of the model; attention layers: "
                             + ", ".join(names))
        chosen.append(item)
    return list(dict.fromkeys(chosen))


class _AllCaptured(Exception):
    """Raised from a hook to stop the forward once every selected layer has been seen."""


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor,
                   layers: LayerSpec | Iterable[LayerSpec] | None = None) -> dict[str, torch.Tensor]:
    """Attention weights of ``SelfAttention2d`` layers for a batch, in eval mode (the train flag is restored).

    Args:
        images: the model's input, ``(B, C, H, W)``, normalised as the model expects.
        layers: ``None`` for every attention layer; a module name (``"layer3.0.conv2"``), an index into
            ``attention_layers(model)`` (negative counts from the end), or a list of them.

    Returns:
        ``{name: weights}`` in the order asked, each ``(B, H_l, W_l, heads, k, k)`` at the layer's input (pre-pool)
        resolution ``H_l x W_l``; entry ``[..., a, b]`` is the weight of the neighbour at offset
        ``(a - k // 2, b - k // 2)``. Each window sums to 1; with ``padding="zeros"`` part of that mass sits on
        positions outside the map (see ``sasa.local_attention_2d``).
    """
    chosen = resolve_layers(model, layers)
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module: SelfAttention2d, args) -> None:
            if name not in captured:
                captured[name] = module.attention_weights(args[0])
            if len(captured) == len(chosen):
                raise _AllCaptured

        return hook

    handles = [modules[name].register_forward_pre_hook(make_hook(name)) for name in chosen]
    was_training = model.training
    try:
        model.eval()
        model(images)
    except _AllCaptured:
        pass
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    missing = [name for name in chosen if name not in captured]
    if missing:
        raise RuntimeError(f"attention layer(s) {missing} did not run in the model's forward")
    return {name: captured[name] for name in chosen}
