"""Model registry: ``create_model(name, num_classes=1000, **overrides)`` and ``list_models()``.

Every registered name is also the CLI string (``sasa train --model NAME``, ``sasa info NAME``). Each entry carries
its architecture config and the paper's figures as printed in its Table 1 (SPEC section 3) as metadata in
``MODEL_INFO`` (``paper_params_m``, ``paper_gflops``, ``paper_top1``)."""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable

from torch import nn

from .resnet import ResNet

_MODELS: dict[str, Callable[..., nn.Module]] = {}
MODEL_INFO: dict[str, dict] = {}

DEPTHS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3)}
VARIANTS = {
    "": dict(attention_stages=(), stem="conv"),
    "_convstem": dict(attention_stages=(1, 2, 3, 4), stem="conv"),
    "_full": dict(attention_stages=(1, 2, 3, 4), stem="attention"),
}
# The paper's Table 1 (SPEC section 3) as printed: params (M), GFLOPs, ImageNet top-1 (%). Our own counts are
# computed from the models (``sasa info --paper`` prints them beside these), never stored here.
PAPER = {
    "resnet26": (13.7, 4.7, 74.5), "sasa_resnet26_convstem": (10.3, 4.5, 75.8), "sasa_resnet26": (10.3, 4.7, 74.8),
    "resnet38": (19.6, 6.5, 76.2), "sasa_resnet38_convstem": (14.1, 5.7, 77.1), "sasa_resnet38": (14.1, 6.0, 76.9),
    "resnet50": (25.6, 8.2, 76.9), "sasa_resnet50_convstem": (18.0, 7.0, 77.4), "sasa_resnet50": (18.0, 7.2, 77.6),
}
_RESNET_ARGS = set(inspect.signature(ResNet.__init__).parameters) - {"self", "layers", "num_classes"}
_BUILDER_ARGS = {"bn_momentum"}  # applied by the builders after ``ResNet(...)``


def register_model(name: str, builder: Callable[..., nn.Module], **info) -> None:
    """Add ``builder(num_classes=..., **overrides)`` under ``name``."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered already")
    _MODELS[name] = builder
    MODEL_INFO[name] = info


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, sorted; ``pattern`` filters with shell wildcards (``"sasa_*"``)."""
    names = sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def create_model(name: str, num_classes: int = 1000, **overrides) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from ``list_models()``.
        num_classes: classifier outputs.
        **overrides: any ``sasa.models.ResNet`` argument, e.g. ``kernel_size=7``, ``attention_stages=(3, 4)``,
            ``positional="absolute"``, ``query_key=False``, ``stem="attention"``, ``stem_values="plain"``,
            ``width_multiplier=0.5``, ``heads=8``, ``in_chans=1``, ``stem_relu=True``; memory:
            ``recompute_qkv=True``, ``checkpoint_stem=True``; and ``bn_momentum``: the momentum of every BatchNorm
            layer in PyTorch's convention (1 - decay: the paper's decay 0.9999 is ``bn_momentum=1e-4``; None keeps
            PyTorch's 0.1).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    valid = _RESNET_ARGS | _BUILDER_ARGS
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise TypeError(f"unknown override(s) {unknown} for model {name!r}; valid: {sorted(valid)}")
    return _MODELS[name](num_classes=num_classes, **overrides)


def set_bn_momentum(model: nn.Module, momentum: float) -> nn.Module:
    """Set the running-statistics momentum of every BatchNorm layer of ``model`` (PyTorch's convention: the new batch's
    weight, 1 - decay), in place; frozen or other norms are left alone."""
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"bn_momentum must be in (0, 1] (PyTorch's convention, 1 - decay), got {momentum!r}")
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
    return model


def _resnet_builder(layers, defaults: dict) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000, bn_momentum: float | None = None, **overrides) -> nn.Module:
        model = ResNet(layers, num_classes=num_classes, **{**defaults, **overrides})
        return set_bn_momentum(model, bn_momentum) if bn_momentum is not None else model

    return build


for _depth, _layers in DEPTHS.items():
    for _suffix, _cfg in VARIANTS.items():
        _name = f"resnet{_depth}" if not _suffix else f"sasa_resnet{_depth}" + ("" if _suffix == "_full" else _suffix)
        _params, _gflops, _top1 = PAPER[_name]
        register_model(_name, _resnet_builder(_layers, _cfg), layers=_layers, config=_cfg, paper_params_m=_params,
                       paper_gflops=_gflops, paper_top1=_top1, input_size=(3, 224, 224))

# Tiny models in the real registry so tests exercise the real code path (timm's habit).
_TINY = dict(width_multiplier=0.25, heads=4, kernel_size=3)
register_model("test_resnet", _resnet_builder((1, 1, 1, 1), dict(_TINY, attention_stages=())),
               layers=(1, 1, 1, 1), config=_TINY, input_size=(3, 32, 32))
register_model("test_sasa_resnet", _resnet_builder((1, 1, 1, 1), dict(_TINY, attention_stages=(1, 2, 3, 4),
                                                                      stem="attention")),
               layers=(1, 1, 1, 1), config=_TINY, input_size=(3, 32, 32))
