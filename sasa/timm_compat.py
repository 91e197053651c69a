"""timm interop: the ``sasa_*`` models in timm's registry, so ``timm.create_model("sasa_resnet50", num_classes=10)``,
``features_only=True`` and timm's own ``train.py`` work with them.

Registered: ``sasa_resnet26/38/50`` and ``sasa_resnet26/38/50_convstem`` (the conv baselines and ``test_*`` models
keep timm's own names); every ``sasa.create_model`` override passes through as a keyword. Registration is lazy
(importing timm costs seconds): ``register_when_timm_imported()`` registers now if timm is imported, else from an
import hook. timm's ``train.py`` runs through ``python -m sasa.timm_train path/to/train.py --model sasa_resnet26 ...``.
``pretrained_cfg`` has 224 px, ImageNet mean/std, bicubic, crop 0.875 and no weights (``pretrained=True`` with
``pretrained_cfg_overlay=dict(file="runs/RUN/model.safetensors")`` loads a ``sasa train`` run; timm drops the
classifier when ``num_classes`` differs); ``feature_info`` lists the stem and ``layer1..4``; ``bn_momentum`` /
``bn_eps`` set the BatchNorms; ``global_pool`` and ``num_classes=0`` act as in timm's ResNet; a non-zero
``drop_path_rate`` / ``drop_block_rate`` is refused. The attention layers and the stem are registered as FX leaf
modules (timm's ``register_notrace_module``), so timm's FX feature extraction traces the models around them.
Tested with timm 1.0.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from functools import partial
from pathlib import Path

from torch import nn

from .io.checkpoint import decode_meta
from .layers.stem import AttentionStem
from .models import MODEL_INFO, create_model

TIMM_MODELS = tuple(f"sasa_resnet{d}{s}" for d in (26, 38, 50) for s in ("", "_convstem"))
_registered = False


def _cfg(name: str) -> dict:
    """timm pretrained_cfg: input, normalisation and head for ``name`` (no weights: ``url`` is empty)."""
    info = MODEL_INFO[name]
    notes = (f"paper (Table 1, as printed): {info['paper_params_m']}M params, {info['paper_gflops']} GFLOPs, "
             f"{info['paper_top1']}% top-1")
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "conv1" if info["config"]["stem"] == "conv" else ("conv1.query", "conv1.key"),
            "classifier": "fc",
            "paper_ids": "arXiv:1906.05909", "paper_name": "Stand-Alone Self-Attention in Vision Models",
            "notes": (notes,)}


def feature_info(model: nn.Module) -> list[dict]:
    """timm ``feature_info`` of a sasa ResNet: the stem activation (``relu``), then ``layer1`` .. ``layer4``."""
    stem_stride = 1 if isinstance(model.conv1, AttentionStem) else model.conv1.stride[0]
    pool = model.maxpool
    pool_stride = 1 if isinstance(pool, nn.Identity) else pool.stride
    pool_stride = pool_stride if isinstance(pool_stride, int) else pool_stride[0]
    info = [{"num_chs": model.bn1.num_features, "reduction": stem_stride, "module": "relu"}]
    reduction = stem_stride * pool_stride
    for i in range(1, 5):
        stage = getattr(model, f"layer{i}")
        reduction *= 1 if i == 1 else 2
        info.append({"num_chs": stage[-1].conv3.out_channels, "reduction": reduction, "module": f"layer{i}"})
    return info


def _build(variant: str, *, drop_path_rate: float = 0.0, drop_block_rate: float = 0.0,
           bn_momentum: float | None = None, bn_eps: float | None = None, device=None, dtype=None,
           **kwargs) -> nn.Module:
    """``sasa.create_model(variant, ...)`` from timm's keyword arguments, with ``feature_info`` attached."""
    for name, value in (("drop_path_rate", drop_path_rate), ("drop_block_rate", drop_block_rate)):
        if value:
            raise ValueError(f"{name}={value}: the sasa ResNets have no stochastic depth or DropBlock; expected 0")
    if bn_momentum is not None or bn_eps is not None:
        bn = {k: v for k, v in (("momentum", bn_momentum), ("eps", bn_eps)) if v is not None}
        kwargs.setdefault("norm_layer", partial(nn.BatchNorm2d, **bn))
    model = create_model(variant, **kwargs)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    model.feature_info = feature_info(model)
    return model


def _sasa_meta(path: str) -> dict:
    """The metadata ``sasa train`` writes into a ``.safetensors`` file (``{}`` for any other file)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return decode_meta(f.metadata() or {})


def _from_run_weights(variant: str, kwargs: dict) -> None:
    """``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=".../model.safetensors")`` of a ``sasa train``
    run: the run's model arguments and input channels become the defaults of ``kwargs``, and its class count and
    input size go into the overlay, so timm keeps the classifier when ``num_classes`` matches the run's (and drops
    it, as for any pretrained model, when it does not)."""
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    file = overlay.get("file")
    if not file or not str(file).endswith(".safetensors") or not Path(file).is_file():
        return
    meta = _sasa_meta(file)
    if not meta.get("model"):
        return  # not written by sasa: timm's own loading rules
    if meta["model"] != variant:
        raise ValueError(f"{file} holds weights of {meta['model']!r}, not {variant!r}: create that model")
    in_chans = int(kwargs.setdefault("in_chans", int(meta.get("in_chans", 3))))
    for key, value in (meta.get("model_args") or {}).items():
        kwargs.setdefault(key, tuple(value) if isinstance(value, list) else value)
    size = meta.get("image_size") or 224
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    kwargs["pretrained_cfg_overlay"] = {"num_classes": int(meta["num_classes"]),
                                        "input_size": (int(meta.get("in_chans", 3)), height, width),
                                        "pool_size": None, **overlay}
    kwargs.setdefault("num_classes", int(meta["num_classes"]))
    if in_chans != int(meta.get("in_chans", 3)):
        raise ValueError(f"{file} was trained with in_chans={meta.get('in_chans', 3)}, got in_chans={in_chans}")


def _create(variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    from timm.models import build_model_with_cfg

    if pretrained:
        _from_run_weights(variant, kwargs)

    return build_model_with_cfg(partial(_build, variant), variant, pretrained,
                                feature_cfg={"feature_cls": "hook", "no_rewrite": True}, **kwargs)


def sasa_resnet26(pretrained: bool = False, **kwargs) -> nn.Module:
    """SASA-ResNet-26, full attention (attention stem + attention in every stage)."""
    return _create("sasa_resnet26", pretrained, **kwargs)


def sasa_resnet26_convstem(pretrained: bool = False, **kwargs) -> nn.Module:
    """SASA-ResNet-26 with the 7x7 convolution stem."""
    return _create("sasa_resnet26_convstem", pretrained, **kwargs)


def sasa_resnet38(pretrained: bool = False, **kwargs) -> nn.Module:
    """SASA-ResNet-38, full attention."""
    return _create("sasa_resnet38", pretrained, **kwargs)


def sasa_resnet38_convstem(pretrained: bool = False, **kwargs) -> nn.Module:
    """SASA-ResNet-38 with the 7x7 convolution stem."""
    return _create("sasa_resnet38_convstem", pretrained, **kwargs)


def sasa_resnet50(pretrained: bool = False, **kwargs) -> nn.Module:
    """SASA-ResNet-50, full attention."""
    return _create("sasa_resnet50", pretrained, **kwargs)


def sasa_resnet50_convstem(pretrained: bool = False, **kwargs) -> nn.Module:
    """SASA-ResNet-50 with the 7x7 convolution stem (18.02M parameters; the paper's Table 1 prints 18.0M)."""
    return _create("sasa_resnet50_convstem", pretrained, **kwargs)


def register() -> None:
    """Register ``TIMM_MODELS`` with timm (imports timm); a second call does nothing."""
    global _registered, default_cfgs
    if _registered:
        return
    from timm.models import generate_default_cfgs, register_model, register_notrace_module

    from .layers.attention import SelfAttention2d

    for leaf in (SelfAttention2d, AttentionStem):  # FX: call them as modules, do not trace their dispatch
        register_notrace_module(leaf)
    default_cfgs = generate_default_cfgs({name: _cfg(name) for name in TIMM_MODELS})  # timm reads it by this name
    for name in TIMM_MODELS:
        register_model(globals()[name])
    _registered = True


def _register_quietly() -> None:
    try:
        register()
    # a timm API change must not break `import timm` for the user: warn instead
    except (ImportError, AttributeError, TypeError, ValueError, KeyError) as err:
        warnings.warn(f"sasa: could not register the sasa_* models with timm: {err!r}", stacklevel=2)


class _RegisterAfterTimmImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when ``timm`` is imported, wraps its loader so ``register()`` runs right after."""

    def __init__(self) -> None:
        self._busy = False

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm" or self._busy:
            return None
        self._busy = True  # the lookup below walks sys.meta_path again, this finder included
        try:
            spec = importlib.util.find_spec("timm")
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module) -> None:
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register_quietly()

        spec.loader.exec_module = exec_then_register  # the loader itself stays (timm reads package data through it)
        return spec


def register_when_timm_imported() -> None:
    """Register now when timm is imported, else once it is; nothing when timm is not installed."""
    if "timm" in sys.modules:
        _register_quietly()
    elif not any(isinstance(f, _RegisterAfterTimmImport) for f in sys.meta_path) and \
            importlib.util.find_spec("timm") is not None:
        sys.meta_path.insert(0, _RegisterAfterTimmImport())
