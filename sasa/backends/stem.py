"""The ``stem`` op's ``shifted`` and ``reference`` backends: the attention stem's block attention, reassociated.

``AttentionStem`` (``sasa/layers/stem.py``) attends inside ``s x s`` blocks of the *image*, whose few input channels
``C`` (3 for RGB) are far narrower than the ``heads * d`` projected channels. Two exact rewrites use that:

- logits: ``q_a . k_b = x_a^T (W_Q,h^T W_K,h) x_b``: one ``C x C`` matrix ``G_h`` per head, so a logit is a
  C-term dot product instead of a d-term one and no q / k tensor is ever formed;
- values (spatially-aware or plain): ``sum_b p_ab sum_m p(b, m) W_V,h^m x_b = sum_m W_V,h^m y_a,m`` with
  ``y_a,m = sum_b p_ab p(b, m) x_b``: attend over the ``M * C``-wide mixed inputs ``p(b, m) x_b``, then project
  once per head with its ``(M * C, d)`` matrix.

``stem_block_attention`` runs that as one ``torch.autograd.Function`` that saves only its inputs (the image in
blocks, ``C`` values per pixel, and four small matrices) and recomputes the mixed inputs and the probabilities in
the backward, so the full-resolution ``heads x s^2`` probabilities and the projected q / k / v are
never kept for the backward. On CPU it runs in chunks of about ``CHUNK_BLOCKS`` blocks (block rows or whole images)
whose temporaries fit in cache. The output is written straight in NCHW order (per-head GEMMs with a transposed
operand; no permute of the 64-channel result). Under autocast the GEMMs run in the autocast dtype and the softmax
and its backward in fp32.

Layouts: ``xb`` ``(N, L, C)`` with N = batch * blocks (row-major: batch, block row, block column) and L = s * s
(row-major inside the block); ``pm`` ``(L, M)``; ``g`` ``(C, heads * C)``; ``wv`` ``(heads, J, d)`` with J = M * C
(J = C for plain values, ``pm=None``). The op itself takes the image ``x`` ``(B, C, H, W)`` and returns
``(B, heads * d, H, W)`` (``sasa.functional.stem_attention``).

``reference`` is the same maths with plain autograd (it keeps the probabilities and the mixed inputs): the op's oracle,
beside the textbook q / k / v formulation ``AttentionStem.reference_forward`` that the layer tests use. The ``triton``
backend (``triton_backend.py``, kernels in ``triton_stem_kernels.py``) is the default on CUDA; under
``torch.compile`` the PyTorch form runs. Exact: float64 gradcheck and tests against ``reference_forward``; measured in
BENCHMARKS.md."""

from __future__ import annotations

import torch

from . import Backend, register


def _probabilities(xb: torch.Tensor, g: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, P)``: u = x G ``(N, L * heads, C)``, rows ordered (query, head); P ``(N, L * heads, L)``, fp32 or fp64."""
    N, L, C = xb.shape
    u = (xb @ g).view(N, L * heads, C)  # (N*L, heads*C) -> (N, L*heads, C)
    logits = u @ xb.transpose(1, 2)  # (N, L*heads, L)
    return u, torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _mixed(xb: torch.Tensor, pm: torch.Tensor | None) -> torch.Tensor:
    """The attended values' inputs: ``p(b, m) x_b`` as ``(N, L, M * C)``, or ``xb`` itself without mixtures."""
    if pm is None:
        return xb
    return (pm[:, :, None] * xb[:, :, None, :]).flatten(2)  # (N, L, M, C) -> (N, L, M*C)


def _to_raster(y: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """``(N, L * heads, J)`` block-ordered rows -> ``(B, H * W, heads * J)`` image-ordered rows (one copy)."""
    B, Hb, Wb, s = shape
    J = y.shape[1] * y.shape[2] // (s * s)
    y = y.view(B, Hb, Wb, s, s, J)  # (B, Hb, Wb, row in block, column in block, heads*J)
    return y.transpose(2, 3).reshape(B, Hb * s * Wb * s, J)


def _to_blocks(yr: torch.Tensor, shape: tuple[int, int, int, int], heads: int) -> torch.Tensor:
    """Inverse of ``_to_raster``: ``(B, H * W, heads * J)`` -> ``(N, L * heads, J)`` (one copy)."""
    B, Hb, Wb, s = shape
    J = yr.shape[-1]
    yr = yr.view(B, Hb, s, Wb, s, J).transpose(2, 3)  # (B, Hb, Wb, s, s, heads*J)
    return yr.reshape(B * Hb * Wb, s * s * heads, J // heads)


def _per_head(out: torch.Tensor, a, b, heads: int, dim: int) -> torch.Tensor:
    """``out = cat([a(h) @ b(h) for h], dim)``, returned. In eager mode each product is written straight into its
    slice of ``out`` (a concatenation would copy the full-resolution result once more); under ``torch.compile``,
    which does not trace ``out=`` into a view, the ``cat`` copied into ``out`` (the compiler fuses both)."""
    if torch.compiler.is_compiling():
        return out.copy_(torch.cat([a(h) @ b(h) for h in range(heads)], dim))
    step = out.shape[dim] // heads
    for h in range(heads):
        torch.matmul(a(h), b(h), out=out.narrow(dim, h * step, step))
    return out


def _project(yr: torch.Tensor, wv: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per-head value projection of image-ordered rows into ``out``: ``(B, H * W, heads * J)`` ->
    ``(B, heads * d, H * W)`` (a view of the NCHW output), one GEMM per head with a transposed operand (a
    block-diagonal weight would waste ``heads``-fold work)."""
    heads, J, d = wv.shape
    return _per_head(out, lambda h: wv[h].t(), lambda h: yr[:, :, h * J:(h + 1) * J].transpose(1, 2), heads, 1)


CHUNK_BLOCKS = 512  # CPU: blocks per chunk (their probabilities: 2 MB for 4 heads of 4x4 blocks, cache-sized)


def _chunks(shape: tuple[int, int, int, int], device: torch.device) -> list[tuple[int, int, int, int]]:
    """``(b0, b1, r0, r1)``: images ``b0:b1``, block rows ``r0:r1`` of each; a chunk's blocks are contiguous in
    ``xb`` and its pixels one range of every image's raster. On CPU about ``CHUNK_BLOCKS`` blocks per chunk, so each
    step's temporaries stay in cache (batch 8, 128x128, one thread: forward ~59 -> ~39 ms, forward + backward
    ~186 -> ~150 ms against whole tensors); elsewhere (and under ``torch.compile``) one chunk."""
    B, Hb, Wb, _ = shape
    if device.type != "cpu" or torch.compiler.is_compiling():
        return [(0, B, 0, Hb)]
    rows = max(1, CHUNK_BLOCKS // Wb)
    if rows < Hb:
        return [(b, b + 1, r, min(r + rows, Hb)) for b in range(B) for r in range(0, Hb, rows)]
    images = rows // Hb
    return [(b, min(b + images, B), 0, Hb) for b in range(0, B, images)]


def _chunk_views(chunk, shape, image: torch.Tensor) -> tuple[slice, torch.Tensor, tuple[int, int, int, int]]:
    """A chunk's blocks (a slice of ``xb``'s first dimension), its ``(b1 - b0, channels, pixels)`` view of
    ``image`` ``(B, channels, H*W)``, and its own ``shape``."""
    b0, b1, r0, r1 = chunk
    _, Hb, Wb, s = shape
    row = s * Wb * s  # pixels per block row
    blocks = slice((b0 * Hb + r0) * Wb, ((b1 - 1) * Hb + r1) * Wb)
    return blocks, image[b0:b1, :, r0 * row:r1 * row], (b1 - b0, r1 - r0, Wb, s)


def _forward(xb, g, pm, wv, shape, out) -> None:
    """The op on one chunk, written into ``out`` ``(B, C_out, pixels)``."""
    xm = _mixed(xb, pm)
    _, P = _probabilities(xb, g, wv.shape[0])
    _project(_to_raster(P.to(xm.dtype) @ xm, shape), wv, out)  # P @ xm: (N, L*heads, J)


def _backward(xb, g, pm, wv, shape, dout):
    """Gradients of one chunk from its ``dout`` ``(B, C_out, pixels)``: ``(dxb, dg, dpm, dwv)``."""
    heads, J, d = wv.shape
    N, L, C = xb.shape
    xm = _mixed(xb, pm)  # recomputed too: an elementwise product
    u, P = _probabilities(xb, g, heads)  # recomputed: nothing of size (N, L*heads, L) was kept
    Pc = P.to(xm.dtype)
    yr = _to_raster(Pc @ xm, shape)  # (B, H*W, heads*J)
    dwv = torch.stack([torch.bmm(yr[:, :, h * J:(h + 1) * J].transpose(1, 2),  # sum over pixels of y_h^T dout_h
                                 dout[:, h * d:(h + 1) * d].transpose(1, 2)).sum(0) for h in range(heads)])
    dyr = _per_head(torch.empty_like(yr), lambda h: dout[:, h * d:(h + 1) * d].transpose(1, 2),
                    lambda h: wv[h].t(), heads, 2)  # dy_h = dout_h^T W_h^T, (B, H*W, heads*J)
    yr = None  # free it (a closure cell: no `del` under torch.compile)
    dy = _to_blocks(dyr, shape, heads)  # (N, L*heads, J)
    del dyr
    dxm = Pc.transpose(1, 2) @ dy  # (N, L, J)
    del Pc
    ds = (dy @ xm.transpose(1, 2)).to(P.dtype)  # dP, (N, L*heads, L)
    del dy
    ds = ds.mul_(P)  # softmax backward in place: ds = P * dP - P * sum(P * dP)
    ds = ds.addcmul_(P, ds.sum(-1, keepdim=True), value=-1).to(xb.dtype)  # d logits
    del P
    du = ds @ xb  # (N, L*heads, C)
    dxb = ds.transpose(1, 2) @ u  # key side, (N, L, C)
    du = du.view(N * L, heads * C)
    dg = xb.reshape(N * L, C).t() @ du  # (C, heads*C)
    dxb = dxb + (du @ g.t()).view(N, L, C)  # query side
    dpm = None
    if pm is not None:  # xm = p(b, m) x_b
        dxm = dxm.view(N, L, -1, C)  # (N, L, M, C)
        dxb = dxb + (dxm * pm[:, :, None]).sum(2)
        dpm = torch.einsum("nlmc,nlc->lm", dxm, xb)
    else:
        dxb = dxb + dxm
    return dxb, dg, dpm, dwv


class _StemAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xb, g, pm, wv, shape: tuple[int, int, int, int]):
        B, Hb, Wb, s = shape
        heads, _, d = wv.shape
        out = xb.new_empty(B, heads * d, Hb * s * Wb * s)
        for chunk in _chunks(shape, xb.device):
            blocks, oc, sc = _chunk_views(chunk, shape, out)
            _forward(xb[blocks], g, pm, wv, sc, oc)
        ctx.save_for_backward(xb, g, pm, wv)
        ctx.shape = shape
        return out.view(B, -1, Hb * s, Wb * s)

    @staticmethod
    def backward(ctx, dout):
        xb, g, pm, wv = ctx.saved_tensors
        shape = ctx.shape
        dout = dout.flatten(2).to(xb.dtype if pm is None else torch.promote_types(xb.dtype, pm.dtype))
        dxb = torch.empty_like(xb)
        dg = dpm = dwv = None
        for chunk in _chunks(shape, xb.device):
            blocks, dc, sc = _chunk_views(chunk, shape, dout)
            dxb[blocks], dgc, dpmc, dwvc = _backward(xb[blocks], g, pm, wv, sc, dc)
            dg, dwv = (dgc, dwvc) if dg is None else (dg + dgc, dwv + dwvc)
            if dpmc is not None:
                dpm = dpmc if dpm is None else dpm + dpmc
        return dxb, dg, dpm, dwv, None


def stem_block_attention(xb: torch.Tensor, g: torch.Tensor, pm: torch.Tensor | None, wv: torch.Tensor, *,
                         shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Block attention of the attention stem in its reassociated form; returns ``(B, C_out, H, W)`` contiguous.

    Args:
        xb: the input in blocks, ``(N, L, C)``.
        g: ``(C, heads * C)``, column block h = ``scale * W_Q,h^T W_K,h``.
        pm: ``(L, M)`` mixture weights p(b, m) of the spatially-aware values (the attended values' inputs are then
            ``p(b, m) x_b``, J = M * C), or None for plain values (``x_b``, J = C).
        wv: ``(heads, J, d)`` value projections (head h maps its J attended inputs to its d output channels).
        shape: ``(B, H / s, W / s, s)``.
    """
    device = xb.device.type
    if device != "meta" and torch.is_autocast_enabled(device):  # meta (shape-only passes) has no autocast state
        dtype = torch.get_autocast_dtype(device)
        xb, g, wv = (t.to(dtype) for t in (xb, g, wv))
        pm = pm.to(dtype) if pm is not None else None
        with torch.autocast(device, enabled=False):
            return _StemAttention.apply(xb, g, pm, wv, shape)
    return _StemAttention.apply(xb, g, pm, wv, shape)


def _blocks(x: torch.Tensor, s: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The image ``(B, C, H, W)`` in ``s x s`` blocks, ``xb`` ``(N, L, C)``, and ``shape`` ``(B, H / s, W / s, s)``."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // s, s, W // s, s)  # (B, C, Hb, s, Wb, s)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, s * s, C), (B, H // s, W // s, s)  # (B*Hb*Wb, s*s, C)


def stem_shifted(x, g, pm, wv, *, block: int) -> torch.Tensor:
    """The ``shifted`` backend's ``apply``: arguments as ``sasa.functional.stem_attention``."""
    xb, shape = _blocks(x, block)
    return stem_block_attention(xb, g, pm, wv, shape=shape)


def stem_reference(x, g, pm, wv, *, block: int) -> torch.Tensor:
    """The ``reference`` backend's ``apply``: the op by plain autograd, nothing recomputed."""
    xb, shape = _blocks(x, block)
    heads, J, d = wv.shape
    y = _to_raster(_probabilities(xb, g, heads)[1].to(xb.dtype) @ _mixed(xb, pm), shape)  # (B, H*W, heads*J)
    out = torch.einsum("bnhj,hjd->bhdn", y.unflatten(2, (heads, J)), wv)  # (B, heads, d, H*W)
    return out.reshape(x.shape[0], heads * d, *x.shape[2:])


def _can_run(x, **_) -> str | None:
    return None


register(Backend(name="shifted", op="stem", apply=stem_shifted, can_run=_can_run, priority={"cpu": 10, "cuda": 5,
                                                                                           "meta": 10}))
register(Backend(name="reference", op="stem", apply=stem_reference, can_run=_can_run,
                 priority={"cpu": 0, "cuda": 0, "meta": 0}))
