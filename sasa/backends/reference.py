"""The ``reference`` backend: the readable oracle that defines the semantics of ``local_attention_2d``.

It pads K and V, unfolds every k x k window (k*k-fold memory: for tests, not training) and lets autograd
differentiate. Any device and dtype, float64 included: the target of every gradcheck and of every other backend's
tests. Layout and maths in ``sasa/functional.py``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Backend, register


def _windows(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Zero-pad (B, H, W, h, d) by k//2 and return its k x k windows as a view (B, H, W, h, d, k, k)."""
    r = kernel_size // 2
    xp = F.pad(x, (0, 0, 0, 0, r, r, r, r))  # (B, H+2r, W+2r, h, d)
    return xp.unfold(1, kernel_size, 1).unfold(2, kernel_size, 1)  # (B, H, W, h, d, k, k)


def _rel_logits(q_half: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """q_half (B, H, W, h, c) . table (k, c) or (h, k, c) -> (B, H, W, h, k)."""
    if table.dim() == 2:
        return torch.einsum("bijhc,xc->bijhx", q_half, table)
    return torch.einsum("bijhc,hxc->bijhx", q_half, table)


def attention_probs(q, k, rel_rows, rel_cols, kernel_size, padding, scale) -> torch.Tensor:
    """The softmax weights of every window, ``(B, H, W, heads, k, k)``; index [..., a, b] is offset (a - r, b - r)."""
    B, H, W, heads, d = q.shape
    K = kernel_size
    logits = q.new_zeros(B, H, W, heads, K, K)
    if k is not None:
        logits = logits + torch.einsum("bijhd,bijhdxy->bijhxy", q, _windows(k, K))
    if rel_rows is not None:
        logits = logits + _rel_logits(q[..., : d // 2], rel_rows.to(q.dtype))[..., :, None]
    if rel_cols is not None:
        logits = logits + _rel_logits(q[..., d // 2 :], rel_cols.to(q.dtype))[..., None, :]
    logits = logits * scale
    if padding == "mask":
        inside = _windows(q.new_ones(1, H, W, 1, 1), K)[0, :, :, 0, 0]  # (H, W, k, k): 1 inside the image
        logits = logits.masked_fill(inside[None, :, :, None] == 0, float("-inf"))
    return torch.softmax(logits.reshape(B, H, W, heads, K * K), dim=-1).reshape(B, H, W, heads, K, K)


def reference_attention(q, k, v, rel_rows, rel_cols, kernel_size, padding, scale):
    """Reference computation, differentiable by autograd. Shapes as in ``sasa.local_attention_2d``."""
    probs = attention_probs(q, k, rel_rows, rel_cols, kernel_size, padding, scale)
    return torch.einsum("bijhxy,bijhdxy->bijhd", probs, _windows(v, kernel_size))


def _can_run(q, **_) -> str | None:
    return None


register(Backend(name="reference", op="window", apply=reference_attention, can_run=_can_run,
                 priority={"cpu": 0, "cuda": 0, "meta": 0}))
