"""Recompute activations in the backward instead of keeping them: ``recompute_saved_views``, and
``checkpoint_keeping_buffers``.

``SelfAttention2d`` passes q, k and v to the attention op as views of one fused 1x1 projection ``y`` (3 x C_out
channels); a backend that saves its inputs for the backward (the Triton kernels do) keeps all of ``y`` alive until
the backward, the largest activation a SASA layer adds over the convolution it replaces. Inside
``recompute_saved_views(y, recompute)``, autograd saves every view of ``y`` as a recipe (shape, strides, offset);
the first unpack in the backward calls ``recompute()`` (the projection again, from its input, which the projection
keeps for its own weight gradient anyway) and rebuilds the views from the result. Memory: one fewer 3 x C_out
activation per layer held from forward to backward; time: one more 1x1 projection per layer in the backward.

Backends that save their own tensors (copies) rather than views of ``y`` are unaffected (correct, no saving).
The recompute runs under the autocast state of the forward; if the projection's input changed in place between
forward and backward, the unpack raises instead of returning different values.

``checkpoint_keeping_buffers(fn, x, modules)`` is ``torch.utils.checkpoint`` (non-reentrant) whose recompute in the
backward leaves the buffers of ``modules`` as the forward left them: a BatchNorm inside the checkpointed region
updates its running statistics once per step, not twice. ``ResNet(checkpoint_stem=True)`` uses it for the stem
part, whose full-resolution activations are the largest of the attention-stem model.

Status: complete; both opt-in (``SelfAttention2d(recompute_qkv=True)``, ``ResNet(checkpoint_stem=True)``), their
GPU time cost not yet measured.
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
