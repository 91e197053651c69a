"""FLOP accounting: ``count_flops(model, input_size)`` with the paper's convention (SPEC section 3).

One multiply-add counts as 2 FLOPs. Counted: convolutions, linear layers, and the SASA layers with the paper's
convention: per pixel at the pre-pool resolution, ``P * C_in * C_out`` multiply-adds for the P projections plus
``T * k * k * C_out`` for the T window terms (q.k, q.r and weights-times-values, so P = T = 3 by default; the
q.r-only ablation drops one of each, ``positional`` absolute/none drops q.r). The attention stem counts its
projections (``2 + m`` value matrices for spatially-aware values), the mixture and both attention products.
Normalisation, activations, pooling and additions are not counted, as in the paper's table. The count is one
forward pass with hooks (``shape_forward``), so it works for any module, ``sasa.convert_to_attention``'s included."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from . import backends
from .layers.attention import SelfAttention2d
from .layers.stem import AttentionStem


def attention_macs(layer: SelfAttention2d, height: int, width: int) -> int:
    """Multiply-adds of one ``SelfAttention2d`` on a ``height x width`` input."""
    terms = 1 + int(layer.query_key) + int(layer.positional == "relative")
    projections = layer.num_proj * layer.in_channels * layer.out_channels
    per_pixel = projections + terms * layer.kernel_size**2 * layer.out_channels
    return per_pixel * height * width


def stem_macs(stem: AttentionStem, height: int, width: int) -> int:
    """Multiply-adds of an ``AttentionStem`` on a ``height x width`` input."""
    cin, cout, area = stem.in_channels, stem.out_channels, stem.block_size**2
    per_pixel = 2 * cin * cout + 2 * area * cout  # q, k projections; q.k and weights-times-values
    if stem.values == "spatial":
        per_pixel += stem.mixtures * cin * cout + stem.mixtures * cout
    elif stem.values == "plain":
        per_pixel += cin * cout
    else:
        per_pixel += stem.value.kernel_size[0] * stem.value.kernel_size[1] * cin * cout
    return per_pixel * height * width


def count_flops(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 224, 224)) -> int:
    """FLOPs (2 per multiply-add) of one forward pass of any ``model`` on an input of ``input_size``
    ``(B, C, H, W)`` (FLOPs scale with B); SASA layers and the attention stem with the paper's convention."""
    if len(input_size) != 4:
        raise ValueError(f"input_size must be (B, C, H, W), got {input_size!r}")
    totals: list[int] = []
    inside = set()
    for m in model.modules():
        if isinstance(m, (SelfAttention2d, AttentionStem)):
            inside.update(id(sub) for sub in m.modules() if sub is not m)

    def hook(module, inputs, output):
        x = inputs[0]
        batch = x.shape[0]
        if isinstance(module, SelfAttention2d):
            totals.append(batch * attention_macs(module, x.shape[2], x.shape[3]))
        elif isinstance(module, AttentionStem):
            totals.append(batch * stem_macs(module, x.shape[2], x.shape[3]))
        elif isinstance(module, nn.Conv2d):
            per_out = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            totals.append(output.numel() * per_out)
        elif isinstance(module, nn.Linear):
            totals.append(output.numel() * module.in_features)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if id(m) not in inside and isinstance(m, (SelfAttention2d, AttentionStem, nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        shape_forward(model, input_size, reset=totals.clear)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return 2 * sum(totals)


def shape_forward(model: nn.Module, input_size: tuple[int, ...], *, reset: Callable[[], object] | None = None) -> None:
    """One forward pass of ``model`` on zeros of ``input_size`` for the shapes its hooks see: on a meta-device copy
    (no arithmetic; hooks travel with the copy), else, for modules that cannot run on meta, on the model's own device
    after ``reset()`` (forget what the failed meta pass recorded). Attention runs the eager ``shifted`` backend
    whatever the layers or ``SASA_BACKEND`` ask for, so this never compiles."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    with torch.no_grad(), backends.force("shifted"):
        try:
            meta = copy.deepcopy(model).to("meta")  # hooks travel with the copy
            meta(torch.zeros(input_size, device="meta", dtype=dtype))
            return
        except (NotImplementedError, RuntimeError):
            if reset is not None:
                reset()
        device = param.device if param is not None else torch.device("cpu")
        model(torch.zeros(input_size, device=device, dtype=dtype))


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
