"""The window op in standard operators only: what scripted and exported models run.

``window_attention_portable`` computes ``local_attention_2d``'s maths (SPEC section 1) channels-first with shifted
slices of the zero-padded keys and values, one row of the window at a time, and autograd's backward: no custom op,
no custom autograd function, no backend choice, so ``torch.jit.script``, ``torch.jit.trace``, ``torch.export`` and
both ONNX exporters take it. It is not a registry entry: eager calls and ``torch.compile`` go through ``choose``.
"""

from __future__ import annotations

from typing import Optional  # TorchScript reads typing.Optional on every supported torch, not "X | None"

import torch
import torch.nn.functional as F


def _rel_logits(q_half: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """q_half ``(B, heads, c, H, W)`` . table ``(k, c)`` or ``(heads, k, c)`` -> ``(B, heads, k, H, W)``."""
    if table.dim() == 2:
        return torch.einsum("bncij,xc->bnxij", q_half, table.to(q_half.dtype))
    return torch.einsum("bncij,nxc->bnxij", q_half, table.to(q_half.dtype))


def window_attention_portable(q: torch.Tensor, k: Optional[torch.Tensor], v: torch.Tensor,  # noqa: UP045
                              rel_rows: Optional[torch.Tensor], rel_cols: Optional[torch.Tensor],  # noqa: UP045
                              kernel_size: int, mask: bool, scale: float) -> torch.Tensor:
    """``local_attention_2d``'s maths (``sasa/functional.py``) in standard operators, channels-first: scriptable,
    traceable and exportable, with autograd's backward (no custom op, no backend choice).

    Args:
        q, k, v: ``(B, heads, head_dim, H, W)``; ``k`` None for q.r-only logits.
        rel_rows, rel_cols: ``(k, head_dim // 2)`` or ``(heads, k, head_dim // 2)`` tables, or None.
        kernel_size: odd window size.
        mask: ``padding="mask"`` (out-of-image positions leave the softmax) instead of ``"zeros"``.
        scale: logit scale.

    Returns:
        ``(B, heads, head_dim, H, W)``.
    """
    B, heads, d, H, W = q.shape
    K = kernel_size
    r = K // 2
    # keys and values zero-padded together, (B, heads, 2d or d, H + 2r, W + 2r); one row band per row offset a
    kv = F.pad(torch.cat((k, v), 2) if k is not None else v, (r, r, r, r))
    rows = []  # per row offset a: the K column-shifted windows, (B, heads, K, 2d or d, H, W)
    for a in range(K):
        band = kv[:, :, :, a:a + H]
        cols = []
        for b in range(K):
            cols.append(band[:, :, :, :, b:b + W])
        rows.append(torch.stack(cols, 2))
    if k is not None:
        logits = torch.cat([(q.unsqueeze(2) * w[:, :, :, :d]).sum(3) for w in rows], 2)  # (B, heads, K*K, H, W)
    else:
        logits = q.new_zeros(B, heads, K * K, H, W)
    if rel_rows is not None:  # offset (a, b) sits at a*K + b
        rel = _rel_logits(q[:, :, : d // 2], rel_rows)
        logits = logits + rel.unsqueeze(3).expand(-1, -1, -1, K, -1, -1).flatten(2, 3)
    if rel_cols is not None:
        rel = _rel_logits(q[:, :, d // 2 :], rel_cols)
        logits = logits + rel.unsqueeze(2).expand(-1, -1, K, -1, -1, -1).flatten(2, 3)
    logits = logits * scale
    if mask:
        ones = F.pad(q.new_ones(1, 1, H, W), (r, r, r, r))
        windows = []
        for a in range(K):
            for b in range(K):
                windows.append(ones[:, 0, a:a + H, b:b + W])
        inside = torch.stack(windows, 1)  # (1, K*K, H, W): 1 where the offset lands inside the image
        logits = logits.masked_fill(inside.unsqueeze(1) == 0, float("-inf"))
    probs = torch.softmax(logits, dim=2).unflatten(2, (K, K))  # (B, heads, K, K, H, W)
    out = (probs[:, :, 0].unsqueeze(3) * rows[0][:, :, :, -d:]).sum(2)
    for a in range(1, K):
        out = out + (probs[:, :, a].unsqueeze(3) * rows[a][:, :, :, -d:]).sum(2)
    return out  # (B, heads, d, H, W)
