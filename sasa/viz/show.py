"""``sasa show-attention``: load a model, its weights and an image, and draw what one attention layer attends to.

- Model: a registered name plus overrides; what the command line leaves out (name, overrides, image size,
  normalisation) comes from the weights' metadata, then from a run's ``config.yaml`` beside them or one level up
  (``model`` as a name or a ``{name: ..., **overrides}`` mapping, ``model_args`` / ``model_kwargs`` /
  ``overrides``, ``image_size``, ``mean``, ``std`` at the top level or under ``data``). ``num_classes`` and
  ``in_chans`` otherwise come from the weights' ``fc.weight`` and ``conv1.weight``.
- Weights: anything ``sasa.io.checkpoint.read_weights`` reads; without weights the model is randomly initialised
  (a notice on stderr).
- Image: any PIL-readable file, as grayscale or RGB, resized to a square of ``image_size`` (default: the run
  config's, else the registry's), normalised with the config's mean/std, else ImageNet's (3 channels) or
  Fashion-MNIST's (1).
- Layer: a module name or an index into the attention layers. Default: the deepest whose input map is at least
  ``2k - 1`` cells on its shorter side (a central query's window then lies inside the map), else the first.
  Stride-2 layers attend at their input resolution (the pool comes after).
- Pixels: ``(y, x)`` in the resized image, mapped to the layer's map; default the image centre.

Nothing compiles: layer sizes come from a meta-device forward, and the drawing forward runs the eager ``shifted``
backend (the maps come from the reference backend either way).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import backends
from ..flops import shape_forward
from ..io.checkpoint import read_weights
from ..layers.attention import SelfAttention2d
from ..models import MODEL_INFO, create_model
from .maps import attention_layers, attention_maps, resolve_layers
from .plot import plot_attention

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


def find_run_config(weights: str | Path) -> dict:
    """The ``config.yaml`` beside ``weights`` or one directory up, as a dict; ``{}`` when there is none."""
    import yaml

    path = Path(weights)
    for folder in (path.parent, path.parent.parent):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            cfg = yaml.safe_load(candidate.read_text()) or {}
            if not isinstance(cfg, dict):
                raise ValueError(f"{candidate} must hold a mapping, got {type(cfg).__name__}")
            return cfg
    return {}


def _from_config(cfg: dict) -> dict:
    """Model name, overrides, image size, mean and std from a run config (absent keys give None / {})."""
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    model = cfg.get("model")
    args = dict(model) if isinstance(model, dict) else {}
    name = args.pop("name", None) if isinstance(model, dict) else model
    for key in ("model_args", "model_kwargs", "overrides"):
        if isinstance(cfg.get(key), dict):
            args.update(cfg[key])
    return {"name": name, "args": args, "image_size": cfg.get("image_size", data.get("image_size")),
            "mean": cfg.get("mean", data.get("mean")), "std": cfg.get("std", data.get("std"))}


def build_model(name: str, overrides: dict, state: dict[str, torch.Tensor] | None) -> nn.Module:
    """``create_model(name, **overrides)`` with ``state`` loaded; num_classes / in_chans inferred from ``state``."""
    from ..io.checkpoint import CheckpointError, load_state_dict_checked

    overrides = dict(overrides)
    if state is not None:
        if "fc.weight" in state:
            overrides.setdefault("num_classes", state["fc.weight"].shape[0])
        if "conv1.weight" in state and state["conv1.weight"].dim() == 4:
            overrides.setdefault("in_chans", state["conv1.weight"].shape[1])
    model = create_model(name, **overrides)
    if state is not None:
        try:
            load_state_dict_checked(model, state, source="--weights")
        except CheckpointError as err:
            raise ValueError(f"{err}. Built {name} with overrides {overrides}: pass the training run's --model-args "
                             f"(e.g. in_chans=1,stem=small,width_multiplier=0.5)") from None
    return model.eval()


def load_image(path: str | Path, in_chans: int, size: int, mean, std) -> tuple[np.ndarray, torch.Tensor]:
    """``(shown, batch)``: the resized uint8 image, ``(H, W)`` or ``(H, W, 3)``, and its normalised ``(1, C, H, W)``."""
    from PIL import Image

    if in_chans not in (1, 3):
        raise ValueError(f"show-attention reads grayscale or RGB images, so in_chans must be 1 or 3, got {in_chans}")
    with Image.open(path) as img:
        img = img.convert("L" if in_chans == 1 else "RGB").resize((size, size), Image.BILINEAR)
        shown = np.asarray(img)
    x = torch.from_numpy(shown.copy()).float().div(255.0)
    x = x[None] if in_chans == 1 else x.permute(2, 0, 1)  # (C, H, W)
    mean = torch.tensor(mean if mean is not None else (IMAGENET_MEAN if in_chans == 3 else FASHION_MNIST_MEAN))
    std = torch.tensor(std if std is not None else (IMAGENET_STD if in_chans == 3 else FASHION_MNIST_STD))
    return shown, ((x - mean[:, None, None]) / std[:, None, None])[None]


def layer_input_sizes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Input (pre-pool) map size ``(H, W)`` of every attention layer for an input shaped like ``x``
    (``sasa.flops.shape_forward``)."""
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(module, args) -> None:  # returns None, so the input passes on unchanged
            sizes.setdefault(name, (int(args[0].shape[-2]), int(args[0].shape[-1])))

        return hook

    handles = [layer.register_forward_pre_hook(record(name)) for name, layer in attention_layers(model).items()]
    try:
        shape_forward(model, tuple(x.shape), reset=sizes.clear)
    finally:
        for h in handles:
            h.remove()
    return sizes


def default_layer(layers: dict[str, SelfAttention2d], sizes: dict[str, tuple[int, int]]) -> str:
    """The deepest layer with an input map of at least ``2k - 1`` on its shorter side, else the first layer."""
    fits = [name for name in sizes if min(sizes[name]) >= 2 * layers[name].kernel_size - 1]
    return fits[-1] if fits else next(iter(sizes))


def show_attention(model_name: str | None, image: str | Path, out: str | Path, *, weights: str | Path | None = None,
                   model_args: dict | None = None, layer: str | int | None = None,
                   pixels: list[tuple[int, int]] | None = None, image_size: int | None = None,
                   list_layers: bool = False, seed: int = 0) -> str:
    """Write the attention picture to ``out`` (PNG) and return a one-paragraph summary (see the module docstring).
    With ``list_layers``, draw nothing and list the attention layers and their input map sizes; ``seed`` seeds the
    random initialisation."""
    state, meta = read_weights(weights) if weights is not None else (None, {})
    run = _from_config(find_run_config(weights)) if weights is not None else _from_config({})
    saved = _from_config(meta)  # the weights' own metadata wins over the run's config.yaml
    cfg = {key: saved[key] or run[key] for key in run}
    name = model_name or cfg["name"]
    if not name:
        raise ValueError("--model is required (neither the weights' metadata nor a run config.yaml names the model)")
    overrides = {**run["args"], **saved["args"], **(model_args or {})}
    if state is None:
        print(f"sasa show-attention: no --weights given: {name} is randomly initialised, so the maps show untrained "
              "attention", file=sys.stderr)
    torch.manual_seed(seed)
    model = build_model(name, overrides, state)
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"model {name!r} with overrides {overrides} has no SelfAttention2d layer to show")
    stem = getattr(model, "conv1", None)
    in_chans = getattr(stem, "in_channels", overrides.get("in_chans", 3))
    info = MODEL_INFO.get(name, {})
    size = int(image_size or cfg["image_size"] or info.get("input_size", (3, 224, 224))[-1])
    shown, x = load_image(image, in_chans, size, cfg["mean"], cfg["std"])
    sizes = layer_input_sizes(model, x)
    if list_layers:
        return "\n".join(f"{i:3d}  {n:<24} input {sizes[n][0]}x{sizes[n][1]}, k={layers[n].kernel_size}, "
                         f"heads={layers[n].heads}" for i, n in enumerate(sizes))
    chosen = resolve_layers(model, layer)[0] if layer is not None else default_layer(layers, sizes)
    pixels = list(pixels) if pixels else [(size // 2, size // 2)]
    with backends.force("shifted"):
        weights_map = attention_maps(model, x, chosen)[chosen][0]  # (h, w, heads, k, k)
    attn = layers[chosen]
    h, w = weights_map.shape[:2]
    title = (f"{name}  {chosen}: {attn.kernel_size}x{attn.kernel_size} window, {attn.heads} heads, {h}x{w} map"
             + ("  (random init)" if state is None else ""))
    fig = plot_attention(shown, weights_map, pixels, title=title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    return (f"wrote {out}: {name} layer {chosen} ({h}x{w} map, {attn.heads} heads, k={attn.kernel_size}), "
            f"query pixels {pixels} of a {size}x{size} image")
