"""Recompute activations in the backward instead of keeping them (both opt-in; GPU time cost not yet measured).

``recompute_saved_views(y, recompute)`` (``SelfAttention2d(recompute_qkv=True)``): q, k and v are views of one fused
1x1 projection ``y``, which a backend saving its inputs (Triton) keeps alive until the backward. Inside it autograd
saves each view of ``y`` as a recipe; the first unpack in the backward calls ``recompute()`` and rebuilds the views:
one fewer 3 x C_out activation per layer, one more 1x1 projection in the backward. The recompute runs under the
forward's autocast state; an input changed in place since the forward raises instead of giving other values.

``checkpoint_keeping_buffers(fn, x, modules)`` (``ResNet(checkpoint_stem=True)``): non-reentrant
``torch.utils.checkpoint`` whose recompute leaves the buffers of ``modules`` as the forward left them, so a BatchNorm
inside updates its running statistics once per step, not twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class _View(NamedTuple):
    shape: torch.Size
    stride: tuple[int, ...]
    offset: int


@contextlib.contextmanager
def recompute_saved_views(y: torch.Tensor, recompute: Callable[[], torch.Tensor], *,
                          guard: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block, tensors saved for the backward that are views of ``y`` are not kept: the backward
    rebuilds them from ``recompute()``, which must return a tensor equal to ``y`` (called at most once).

    Args:
        y: the activation to drop.
        recompute: computes ``y`` again (grad mode off, the forward's autocast state).
        guard: the tensor ``recompute`` reads; its in-place modification before the backward raises.
    """
    ptr = y.untyped_storage().data_ptr()
    shape, stride, dtype = y.shape, y.stride(), y.dtype
    device = y.device.type
    autocast = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    version = guard._version if guard is not None else None
    cache: list[torch.Tensor] = []

    def pack(t: torch.Tensor):
        if ptr and t.untyped_storage().data_ptr() == ptr:
            return _View(t.shape, t.stride(), t.storage_offset())
        return t

    def unpack(saved):
        if not isinstance(saved, _View):
            return saved
        if not cache:
            if guard is not None and guard._version != version:
                raise RuntimeError("recompute_qkv: the attention layer's input was modified in place after the "
                                   "forward; its projection cannot be recomputed (use recompute_qkv=False)")
            with torch.no_grad(), torch.autocast(device, dtype=autocast[1], enabled=autocast[0]):
                z = recompute().to(dtype)
            if z.shape != shape or z.stride() != stride:  # rebuild y's exact memory layout for the views
                z = torch.empty_strided(shape, stride, dtype=dtype, device=z.device).copy_(z)
            cache.append(z)
        return cache[0].as_strided(saved.shape, saved.stride, saved.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


@contextlib.contextmanager
def _buffers_kept(modules: list[nn.Module]) -> Iterator[None]:
    """Restore every buffer of ``modules`` (running mean / var, batch counters) on exit."""
    kept = [(buf, buf.clone()) for m in modules for buf in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in kept:
                buf.copy_(value)


def checkpoint_keeping_buffers(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                               modules: list[nn.Module]) -> torch.Tensor:
    """``fn(x)`` keeping only ``x`` for the backward, which runs ``fn`` again (``torch.utils.checkpoint``,
    non-reentrant); that second run leaves the buffers of ``modules`` (BatchNorm running statistics) unchanged.

    Args:
        fn: the region to recompute; deterministic apart from the buffers it updates.
        x: its input.
        modules: the modules whose buffers ``fn`` updates (e.g. the BatchNorm in the region).
    """
    if torch.compiler.is_compiling():  # the compiled graph recomputes pure ops only; buffer updates happen once
        return checkpoint(fn, x, use_reentrant=False)
    return checkpoint(fn, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _buffers_kept(modules)))
