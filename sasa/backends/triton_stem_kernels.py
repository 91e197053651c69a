"""Triton kernels of the attention stem's block attention (``sasa/layers/stem_attention.py``), forward and backward.

The same reassociated maths as the PyTorch op there, per ``S x S`` block of the *image* (``L = S*S`` pixels,
``C`` input channels, ``HEADS`` heads of ``D`` output channels, ``M`` value mixtures): per head,
``u = x G_h`` (C wide), logits ``u_q . x_k``, ``P = softmax_k``, attended mixed inputs
``y_{m,c}[q] = sum_k P[q, k] pm[k, m] x_c[k]`` (``M = 1`` and ``pm = 1`` for plain values), and the output
``out[q, h*D + o] = sum_{m,c} y_{m,c}[q] wv[h, m*C + c, o]``. A program holds ``NB`` whole blocks as
``(NB, LP, LP)`` register tiles (``LP`` = L rounded up to a power of two, padding keys masked), reads the image
straight from its ``(B, C, H, W)`` strides (no blocked copy) and writes the output in NCHW: nothing of size
``heads x L`` per pixel ever reaches memory. The loops over the input channels are unrolled at compile time, those
over heads and mixtures run at run time (unrolled, the backward took two minutes to compile and spilled).

- ``_stem_fwd_kernel``: the output.
- ``_stem_bwd_kernel``: recomputes the forward per block, writes the image gradient, and one partial per program
  of the gradients of ``g`` (``(C, HEADS*C)``), ``pm`` (``(L, M)``) and ``wv`` (``(HEADS, M*C, D)``), which the host
  sums in a fixed order: no atomics, deterministic.

All arithmetic in fp32. Plain Triton, loaded lazily by ``triton_backend`` (compiled for CUDA tensors, interpreted
for CPU tensors in the tests). Status: correct against the PyTorch op in the interpreter (tests); compiled offline
for sm_90a; not yet run on a GPU (``tools/gpu_check.py`` checks it there).
"""

import torch
import triton
import triton.language as tl

BLOCKS_PER_PROGRAM = 8
NUM_WARPS = 4


@triton.jit
def _pixels(X, s_b, s_c, s_h, s_w, NBLK, HB, WB, S: tl.constexpr, NB: tl.constexpr, LP: tl.constexpr):
    """``(NB, LP)`` pixel offsets (channel 0) of this program's blocks, their validity, and the blocks' indices."""
    n = tl.program_id(0) * NB + tl.arange(0, NB)  # block index over (batch, block row, block column)
    q = tl.arange(0, LP)
    b = n // (HB * WB)
    i = ((n // WB) % HB)[:, None] * S + (q // S)[None, :]
    j = (n % WB)[:, None] * S + (q % S)[None, :]
    ok = (n < NBLK)[:, None] & (q < S * S)[None, :]
    return b.to(tl.int64)[:, None] * s_b + i * s_h + j * s_w, ok, n


@triton.jit
def _x(X, pix, ok, s_c, c):
    return tl.load(X + pix + c * s_c, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _u(X, pix, ok, s_c, G, h, c, C: tl.constexpr, HEADS: tl.constexpr):
    """``(NB, LP)``: channel c of ``u = x G_h`` (``G`` is ``(C, HEADS * C)``, column block h)."""
    u = _x(X, pix, ok, s_c, 0) * tl.load(G + h * C + c).to(tl.float32)
    for c2 in tl.static_range(1, C):
        u += _x(X, pix, ok, s_c, c2) * tl.load(G + c2 * HEADS * C + h * C + c).to(tl.float32)
    return u


@triton.jit
def _probs(X, pix, ok, s_c, G, h, key_ok, C: tl.constexpr, HEADS: tl.constexpr, NB: tl.constexpr,
           LP: tl.constexpr):
    """``(NB, LP, LP)`` softmax over the keys (last axis) of head h's logits ``u_q . x_k``; padding keys get 0."""
    logits = tl.zeros([NB, LP, LP], tl.float32)
    for c in tl.static_range(C):
        logits += _u(X, pix, ok, s_c, G, h, c, C, HEADS)[:, :, None] * _x(X, pix, ok, s_c, c)[:, None, :]
    logits = tl.where(key_ok, logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    return p / tl.sum(p, axis=2)[:, :, None]


@triton.jit
def _mixture(PM, kk, m, L: tl.constexpr, M: tl.constexpr, HAS_PM: tl.constexpr):
    """``(LP,)``: p(k, m) over the key positions, ones for plain values."""
    if HAS_PM:
        return tl.load(PM + kk * M + m, mask=kk < L, other=0.0).to(tl.float32)
    return tl.where(kk < L, 1.0, 0.0)


@triton.jit
def _stem_fwd_kernel(
    X, G, PM, WV, OUT,
    sx_b, sx_c, sx_h, sx_w, so_b, so_c, so_h, so_w,
    NBLK, HB, WB,
    S: tl.constexpr, LP: tl.constexpr, C: tl.constexpr, HEADS: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    BD: tl.constexpr, HAS_PM: tl.constexpr, NB: tl.constexpr,
):
    L: tl.constexpr = S * S
    J: tl.constexpr = M * C
    pix, ok, _n = _pixels(X, sx_b, sx_c, sx_h, sx_w, NBLK, HB, WB, S, NB, LP)
    opix, _ok, _n = _pixels(OUT, so_b, so_c, so_h, so_w, NBLK, HB, WB, S, NB, LP)
    kk = tl.arange(0, LP)
    key_ok = (kk < L)[None, None, :]
    o = tl.arange(0, BD)
    for h in range(HEADS):
        p = _probs(X, pix, ok, sx_c, G, h, key_ok, C, HEADS, NB, LP)  # (NB, LP queries, LP keys)
        out = tl.zeros([NB, LP, BD], tl.float32)
        for m in range(M):
            w = p * _mixture(PM, kk, m, L, M, HAS_PM)[None, None, :]
            for c in tl.static_range(C):
                y = tl.sum(w * _x(X, pix, ok, sx_c, c)[:, None, :], axis=2)  # (NB, LP): y_{m,c}
                wrow = tl.load(WV + (h * J + m * C + c) * D + o, mask=o < D, other=0.0).to(tl.float32)
                out += y[:, :, None] * wrow[None, None, :]
        tl.store(OUT + opix[:, :, None] + ((h * D + o) * so_c)[None, None, :], out,
                 mask=ok[:, :, None] & (o < D)[None, None, :])


@triton.jit
def _stem_bwd_kernel(
    X, G, PM, WV, DO, DX, DG, DPM, DWV,
    sx_b, sx_c, sx_h, sx_w, sd_b, sd_c, sd_h, sd_w, sdx_b, sdx_c, sdx_h, sdx_w,
    NBLK, HB, WB,
    S: tl.constexpr, LP: tl.constexpr, C: tl.constexpr, CP: tl.constexpr, HEADS: tl.constexpr, M: tl.constexpr,
    MP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, HAS_PM: tl.constexpr, NB: tl.constexpr,
):
    L: tl.constexpr = S * S
    J: tl.constexpr = M * C
    pid = tl.program_id(0)
    pix, ok, _n = _pixels(X, sx_b, sx_c, sx_h, sx_w, NBLK, HB, WB, S, NB, LP)
    dpix, _ok, _n = _pixels(DO, sd_b, sd_c, sd_h, sd_w, NBLK, HB, WB, S, NB, LP)
    kk = tl.arange(0, LP)
    key_ok = (kk < L)[None, None, :]
    o = tl.arange(0, BD)
    cc = tl.arange(0, CP)
    mm = tl.arange(0, MP)
    dx = tl.zeros([NB, LP, CP], tl.float32)  # image gradient, channel c in column c
    dpm = tl.zeros([LP, MP], tl.float32)
    for h in range(HEADS):
        p = _probs(X, pix, ok, sx_c, G, h, key_ok, C, HEADS, NB, LP)
        do = tl.load(DO + dpix[:, :, None] + ((h * D + o) * sd_c)[None, None, :],
                     mask=ok[:, :, None] & (o < D)[None, None, :], other=0.0).to(tl.float32)  # (NB, LP, BD)
        dp = tl.zeros([NB, LP, LP], tl.float32)
        for m in range(M):
            pmk = _mixture(PM, kk, m, L, M, HAS_PM)
            w = p * pmk[None, None, :]
            for c in tl.static_range(C):
                xc = _x(X, pix, ok, sx_c, c)
                y = tl.sum(w * xc[:, None, :], axis=2)  # (NB, LP queries)
                jrow = (h * J + m * C + c) * D
                tl.store(DWV + pid * HEADS * J * D + jrow + o, tl.sum(tl.sum(y[:, :, None] * do, axis=0), axis=0),
                         mask=o < D)
                wrow = tl.load(WV + jrow + o, mask=o < D, other=0.0).to(tl.float32)
                dy = tl.sum(do * wrow[None, None, :], axis=2)  # (NB, LP queries)
                dp += dy[:, :, None] * (pmk[None, :] * xc)[:, None, :]
                a = tl.sum(w * dy[:, :, None], axis=1)  # (NB, LP keys): sum_q P pm dy
                dx += tl.where(cc[None, None, :] == c, a[:, :, None], 0.0)
                if HAS_PM:
                    pa = tl.sum(p * dy[:, :, None], axis=1)  # (NB, LP keys)
                    dpm += tl.where(mm[None, :] == m, tl.sum(xc * pa, axis=0)[:, None], 0.0)
        ds = p * (dp - tl.sum(p * dp, axis=2)[:, :, None])  # d logits
        for c in tl.static_range(C):
            xc = _x(X, pix, ok, sx_c, c)
            du = tl.sum(ds * xc[:, None, :], axis=2)  # (NB, LP queries)
            key = tl.sum(ds * _u(X, pix, ok, sx_c, G, h, c, C, HEADS)[:, :, None], axis=1)  # (NB, LP keys)
            dx += tl.where(cc[None, None, :] == c, key[:, :, None], 0.0)
            for c2 in tl.static_range(C):
                gij = tl.load(G + c2 * HEADS * C + h * C + c).to(tl.float32)
                dx += tl.where(cc[None, None, :] == c2, (du * gij)[:, :, None], 0.0)
                tl.store(DG + (pid * C + c2) * HEADS * C + h * C + c,
                         tl.sum(tl.sum(_x(X, pix, ok, sx_c, c2) * du, axis=1), axis=0))
    dxpix, _ok, _n = _pixels(DX, sdx_b, sdx_c, sdx_h, sdx_w, NBLK, HB, WB, S, NB, LP)
    tl.store(DX + dxpix[:, :, None] + (cc * sdx_c)[None, None, :], dx, mask=ok[:, :, None] & (cc < C)[None, None, :])
    if HAS_PM:
        tl.store(DPM + pid * L * M + kk[:, None] * M + mm[None, :], dpm, mask=(kk < L)[:, None] & (mm < M)[None, :])


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _config(x, g, pm, wv, block: int) -> dict:
    B, C, H, W = x.shape
    heads, J, D = wv.shape
    M = pm.shape[1] if pm is not None else 1
    return dict(S=block, LP=_next_pow2(block * block), C=C, HEADS=heads, M=M, D=D, BD=_next_pow2(D),
                HAS_PM=pm is not None, NB=BLOCKS_PER_PROGRAM)


def _grid(x, block: int) -> tuple[int, int, int, int]:
    B, _, H, W = x.shape
    n_blocks = B * (H // block) * (W // block)
    return n_blocks, H // block, W // block, triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM)


def forward(x, g, pm, wv, block: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``(B, heads * D, H, W)`` contiguous in ``out_dtype`` from the image ``x`` ``(B, C, H, W)`` (any strides),
    ``g`` ``(C, heads * C)``, ``pm`` ``(L, M)`` or None, ``wv`` ``(heads, M * C, D)`` (contiguous)."""
    B, C, H, W = x.shape
    heads, _, D = wv.shape
    out = torch.empty((B, heads * D, H, W), dtype=out_dtype, device=x.device)
    n_blocks, hb, wb, programs = _grid(x, block)
    if n_blocks:
        _stem_fwd_kernel[(programs,)](x, g, pm if pm is not None else g, wv, out, *x.stride(), *out.stride(),
                                      n_blocks, hb, wb, **_config(x, g, pm, wv, block), num_warps=NUM_WARPS)
    return out


def backward(dout, x, g, pm, wv, block: int):
    """``(dx, dg, dpm, dwv)`` in the dtypes of ``x, g, pm, wv``; dpm is None without ``pm``. Parameter gradients are
    the fixed-order sum of one fp32 partial per program."""
    B, C, H, W = x.shape
    heads, J, D = wv.shape
    cfg = _config(x, g, pm, wv, block)
    n_blocks, hb, wb, programs = _grid(x, block)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dg = torch.zeros((max(programs, 1), C, heads * C), dtype=torch.float32, device=x.device)
    dpm = torch.zeros((max(programs, 1), block * block, cfg["M"]), dtype=torch.float32, device=x.device)
    dwv = torch.zeros((max(programs, 1), heads, J, D), dtype=torch.float32, device=x.device)
    if n_blocks:
        _stem_bwd_kernel[(programs,)](x, g, pm if pm is not None else g, wv, dout, dx, dg, dpm, dwv,
                                      *x.stride(), *dout.stride(), *dx.stride(), n_blocks, hb, wb,
                                      CP=_next_pow2(C), MP=_next_pow2(cfg["M"]), **cfg, num_warps=NUM_WARPS)
    return (dx, dg.sum(0).to(g.dtype), dpm.sum(0).to(pm.dtype) if pm is not None else None,
            dwv.sum(0).to(wv.dtype))
