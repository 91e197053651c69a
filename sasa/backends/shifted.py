"""The ``shifted`` backend: k*k shifted slices of the zero-padded K and V, with a hand-written backward.

Instead of unfolding K and V into k*k-times larger tensors, the forward walks the k*k window offsets and reads
each one as a *view* of the padded K/V (no copy). Autograd saves only q, k, v, the tables and the softmax
probabilities ``(B, H, W, heads, k*k)``; the backward recomputes the rest offset by offset. Peak memory is about
the probabilities plus a few (B, H, W, heads, head_dim) buffers, against k*k copies of K and V for unfold.

Runs on any device and dtype. Default on CPU. See ``sasa/functional.py`` for layout and maths.

Status: complete; the lean training path on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Backend, register


def _pad(x: torch.Tensor, r: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, 0, r, r, r, r))  # (B, H, W, h, d) -> (B, H+2r, W+2r, h, d)


def _rel(q_half: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(B, H, W, h, c) x (k, c) or (h, k, c) -> (B, H, W, h, k)."""
    if table.dim() == 2:
        return q_half @ table.t()
    return torch.einsum("bijhc,hxc->bijhx", q_half, table)


def _rel_grad_q(g: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(B, H, W, h, k) x table -> (B, H, W, h, c): gradient of ``_rel`` w.r.t. q_half."""
    if table.dim() == 2:
        return g @ table
    return torch.einsum("bijhx,hxc->bijhc", g, table)


def _rel_grad_table(g: torch.Tensor, q_half: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Gradient of ``_rel`` w.r.t. the table, summed over batch and pixels."""
    if table.dim() == 2:
        return torch.einsum("bijhx,bijhc->xc", g, q_half)
    return torch.einsum("bijhx,bijhc->hxc", g, q_half)


def _outside_mask(H: int, W: int, K: int, device) -> torch.Tensor:
    """(H, W, 1, K*K) bool, True where the window position falls outside the image."""
    r = K // 2
    inside = F.pad(torch.ones(H, W, device=device), (r, r, r, r))
    win = inside.unfold(0, K, 1).unfold(1, K, 1).reshape(H, W, 1, K * K)  # (H, W, 1, K*K)
    return win == 0


class _ShiftedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rel_rows, rel_cols, K, padding, scale):
        B, H, W, h, d = q.shape
        r = K // 2
        logits = q.new_zeros(B, H, W, h, K * K)
        if k is not None:
            kp = _pad(k, r)
            for a in range(K):
                for b in range(K):
                    logits[..., a * K + b] = torch.linalg.vecdot(q, kp[:, a : a + H, b : b + W])
        view = logits.view(B, H, W, h, K, K)
        if rel_rows is not None:
            view += _rel(q[..., : d // 2], rel_rows.to(q.dtype))[..., :, None]
        if rel_cols is not None:
            view += _rel(q[..., d // 2 :], rel_cols.to(q.dtype))[..., None, :]
        if scale != 1.0:
            logits *= scale
        if padding == "mask":
            logits.masked_fill_(_outside_mask(H, W, K, q.device), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        del logits, view
        out = q.new_zeros(B, H, W, h, d)
        vp = _pad(v, r)
        for a in range(K):
            for b in range(K):
                out.addcmul_(probs[..., a * K + b, None], vp[:, a : a + H, b : b + W])
        ctx.save_for_backward(q, k, v, rel_rows, rel_cols, probs)
        ctx.K, ctx.scale = K, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, rel_rows, rel_cols, probs = ctx.saved_tensors
        K, scale = ctx.K, ctx.scale
        B, H, W, h, d = q.shape
        r = K // 2
        dout = dout.contiguous()
        vp = _pad(v, r)
        dprobs = torch.empty_like(probs)
        for a in range(K):
            for b in range(K):
                dprobs[..., a * K + b] = torch.linalg.vecdot(dout, vp[:, a : a + H, b : b + W])
        # softmax backward: ds = p * (dp - sum(p * dp)), then the logit scale
        ds = probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True))
        del dprobs
        if scale != 1.0:
            ds *= scale
        need_q, need_k, need_v, need_rows, need_cols = ctx.needs_input_grad[:5]
        dq = torch.zeros_like(q) if need_q else None
        dkp = q.new_zeros(B, H + 2 * r, W + 2 * r, h, d) if (k is not None and need_k) else None
        dvp = q.new_zeros(B, H + 2 * r, W + 2 * r, h, d) if need_v else None
        kp = _pad(k, r) if (k is not None and need_q) else None
        for a in range(K):
            for b in range(K):
                o = a * K + b
                if kp is not None:
                    dq.addcmul_(ds[..., o, None], kp[:, a : a + H, b : b + W])
                if dkp is not None:
                    dkp[:, a : a + H, b : b + W].addcmul_(ds[..., o, None], q)
                if dvp is not None:
                    dvp[:, a : a + H, b : b + W].addcmul_(probs[..., o, None], dout)
        ds = ds.view(B, H, W, h, K, K)
        drows = dcols = None
        if rel_rows is not None:
            g = ds.sum(-1)  # (B, H, W, h, K): row offsets
            if need_q:
                dq[..., : d // 2] += _rel_grad_q(g, rel_rows.to(q.dtype))
            if need_rows:
                drows = _rel_grad_table(g, q[..., : d // 2], rel_rows).to(rel_rows.dtype)
        if rel_cols is not None:
            g = ds.sum(-2)  # (B, H, W, h, K): column offsets
            if need_q:
                dq[..., d // 2 :] += _rel_grad_q(g, rel_cols.to(q.dtype))
            if need_cols:
                dcols = _rel_grad_table(g, q[..., d // 2 :], rel_cols).to(rel_cols.dtype)
        dk = dkp[:, r : r + H, r : r + W] if dkp is not None else None
        dv = dvp[:, r : r + H, r : r + W] if dvp is not None else None
        return dq, dk, dv, drows, dcols, None, None, None


def shifted_attention(q, k, v, rel_rows, rel_cols, kernel_size, padding, scale):
    return _ShiftedAttention.apply(q, k, v, rel_rows, rel_cols, kernel_size, padding, scale)


def _can_run(q, **_) -> str | None:
    return None


register(Backend(name="shifted", apply=shifted_attention, can_run=_can_run, priority={"cpu": 10, "cuda": 5}))
