"""Triton kernels of the attention stem's block attention (``stem.py``), forward and backward.

The same reassociated maths as the PyTorch op there, per ``S x S`` block of the *image* (``L = S*S`` pixels,
``C`` input channels, ``HEADS`` heads of ``D`` output channels, ``M`` value mixtures), as ``tl.dot`` products on
operands zero-padded to 16 (tensor cores): per head, ``u = x G_h``, logits ``u x^T``, ``P = softmax`` over the
keys, ``y = P xm`` with the attended inputs ``xm[k, m*C + c] = pm[k, m] x_c[k]`` (``M = 1``, ``pm = 1`` for plain
values), output ``y W_h``. A program holds ``NB`` whole blocks as ``(NB, 16, 16)`` tiles (padding pixels and keys
masked), reads the image straight from its ``(B, C, H, W)`` strides (no blocked copy) and writes the output in
NCHW: nothing of size ``heads x L`` per pixel reaches memory. Needs ``C * M <= 16`` and blocks of up to 16 pixels
(the ``stem`` op's ``can_run`` in ``triton_backend.py``).

- ``_stem_fwd_kernel``: the output.
- ``_stem_bwd_kernel``: recomputes the forward per block, writes the image gradient, and one partial per program
  of the gradients of ``g`` (``(C, HEADS*C)``), ``pm`` (``(L, M)``) and ``wv`` (``(HEADS, M*C, D)``), which the host
  sums in a fixed order: no atomics, deterministic. The attended inputs' gradient folds back onto channels and
  mixtures through 0/1 matrices (a dot).

Precision: softmax and accumulation in fp32; the dots' inputs in IEEE fp32 when the result is fp32, TF32 when it is
bf16 / fp16 (autocast).

Plain Triton, loaded lazily by ``triton_backend`` (compiled for CUDA tensors, interpreted for CPU tensors in the
tests). Tested against the textbook stem in the interpreter and, with ``pytest -m gpu`` (``tests/test_gpu.py``),
on a GPU; each configuration also checks itself at its first use (``selfcheck.py``)."""

import torch
import triton
import triton.language as tl

FWD_BLOCKS = 8  # blocks per program: forward / backward (the backward's tiles at 8 spilled, offline)
BWD_BLOCKS = 4
NUM_WARPS = 4
KP = 16  # padded width of the dots' channel operands (input channels; mixtures x input channels)


@triton.jit
def _pixels(s_b, s_h, s_w, NBLK, HB, WB, S: tl.constexpr, NB: tl.constexpr, LP: tl.constexpr):
    """``(NB, LP)`` element offsets (channel 0) of the pixels of this program's blocks, and their validity."""
    n = tl.program_id(0) * NB + tl.arange(0, NB)  # block index over (batch, block row, block column)
    q = tl.arange(0, LP)
    b = n // (HB * WB)
    i = ((n // WB) % HB)[:, None] * S + (q // S)[None, :]
    j = (n % WB)[:, None] * S + (q % S)[None, :]
    ok = (n < NBLK)[:, None] & (q < S * S)[None, :]
    return b.to(tl.int64)[:, None] * s_b + i * s_h + j * s_w, ok


@triton.jit
def _block_inputs(X, PM, pix, ok, s_c, j, kk, C: tl.constexpr, M: tl.constexpr, L: tl.constexpr,
                  HAS_PM: tl.constexpr):
    """``(x3, xr, pmt)``: the image channels ``(NB, LP, KP)`` (c < C), the attended inputs' channels x_{j % C}
    ``(NB, LP, KP)`` (j < M*C), and p(k, j // C) ``(LP, KP)`` (ones for plain values)."""
    J: tl.constexpr = M * C
    x3 = tl.load(X + pix[:, :, None] + (j * s_c)[None, None, :], mask=ok[:, :, None] & (j < C)[None, None, :],
                 other=0.0).to(tl.float32)
    xr = tl.load(X + pix[:, :, None] + ((j % C) * s_c)[None, None, :], mask=ok[:, :, None] & (j < J)[None, None, :],
                 other=0.0).to(tl.float32)
    pmt = tl.where((kk < L)[:, None] & (j < J)[None, :], 1.0, 0.0)
    if HAS_PM:
        pmt = tl.load(PM + kk[:, None] * M + (j // C)[None, :], mask=(kk < L)[:, None] & (j < J)[None, :],
                      other=0.0).to(tl.float32)
    return x3, xr, pmt


@triton.jit
def _head_probs(G, h, x3, j, kk, C: tl.constexpr, HEADS: tl.constexpr, L: tl.constexpr, NB: tl.constexpr,
                KP: tl.constexpr, PREC: tl.constexpr):
    """``(gh, u, p)`` of head h: G_h ``(KP, KP)``, u = x G_h ``(NB, LP, KP)``, P = softmax over the keys of
    ``u x^T`` ``(NB, LP queries, LP keys)``, padding keys 0."""
    gh = tl.load(G + j[:, None] * HEADS * C + h * C + j[None, :], mask=(j < C)[:, None] & (j < C)[None, :],
                 other=0.0).to(tl.float32)
    u = tl.dot(x3, tl.broadcast_to(gh[None, :, :], (NB, KP, KP)), input_precision=PREC)
    logits = tl.dot(u, tl.trans(x3, (0, 2, 1)), input_precision=PREC)
    logits = tl.where((kk < L)[None, None, :], logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    return gh, u, p / tl.sum(p, axis=2)[:, :, None]


@triton.jit
def _stem_fwd_kernel(
    X, G, PM, WV, OUT,
    sx_b, sx_c, sx_h, sx_w, so_b, so_c, so_h, so_w,
    NBLK, HB, WB,
    S: tl.constexpr, LP: tl.constexpr, C: tl.constexpr, HEADS: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    BD: tl.constexpr, HAS_PM: tl.constexpr, NB: tl.constexpr, KP: tl.constexpr, PREC: tl.constexpr,
):
    L: tl.constexpr = S * S
    J: tl.constexpr = M * C
    pix, ok = _pixels(sx_b, sx_h, sx_w, NBLK, HB, WB, S, NB, LP)
    opix, _ok = _pixels(so_b, so_h, so_w, NBLK, HB, WB, S, NB, LP)
    j = tl.arange(0, KP)
    kk = tl.arange(0, LP)
    o = tl.arange(0, BD)
    x3, xm, pmt = _block_inputs(X, PM, pix, ok, sx_c, j, kk, C, M, L, HAS_PM)
    xm = xm * pmt[None, :, :]  # (NB, LP, KP): p(k, j // C) x_{j % C}[k]
    wmask = (j < J)[:, None] & (o < D)[None, :]
    for h in range(HEADS):
        _gh, _u, p = _head_probs(G, h, x3, j, kk, C, HEADS, L, NB, KP, PREC)
        y = tl.dot(p, xm, input_precision=PREC)  # (NB, LP, KP): y_j, j = m*C + c
        wvh = tl.load(WV + (h * J + j[:, None]) * D + o[None, :], mask=wmask, other=0.0).to(tl.float32)
        out = tl.dot(tl.reshape(y, (NB * LP, KP)), wvh, input_precision=PREC)  # (NB*LP, BD)
        out = tl.reshape(out, (NB, LP, BD))
        tl.store(OUT + opix[:, :, None] + ((h * D + o) * so_c)[None, None, :], out,
                 mask=ok[:, :, None] & (o < D)[None, None, :])


@triton.jit
def _stem_bwd_kernel(
    X, G, PM, WV, DO, DX, DG, DPM, DWV,
    sx_b, sx_c, sx_h, sx_w, sd_b, sd_c, sd_h, sd_w, sdx_b, sdx_c, sdx_h, sdx_w,
    NBLK, HB, WB,
    S: tl.constexpr, LP: tl.constexpr, C: tl.constexpr, HEADS: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    BD: tl.constexpr, HAS_PM: tl.constexpr, NB: tl.constexpr, KP: tl.constexpr, PREC: tl.constexpr,
):
    L: tl.constexpr = S * S
    J: tl.constexpr = M * C
    pid = tl.program_id(0)
    pix, ok = _pixels(sx_b, sx_h, sx_w, NBLK, HB, WB, S, NB, LP)
    dpix, _ok = _pixels(sd_b, sd_h, sd_w, NBLK, HB, WB, S, NB, LP)
    j = tl.arange(0, KP)
    kk = tl.arange(0, LP)
    o = tl.arange(0, BD)
    x3, xr, pmt = _block_inputs(X, PM, pix, ok, sx_c, j, kk, C, M, L, HAS_PM)
    xm = xr * pmt[None, :, :]
    gmask = (j < C)[:, None] & (j < C)[None, :]
    wmask = (j < J)[:, None] & (o < D)[None, :]
    dx = tl.zeros([NB, LP, KP], tl.float32)
    dxm = tl.zeros([NB, LP, KP], tl.float32)
    for h in range(HEADS):
        gh, u, p = _head_probs(G, h, x3, j, kk, C, HEADS, L, NB, KP, PREC)
        do = tl.load(DO + dpix[:, :, None] + ((h * D + o) * sd_c)[None, None, :],
                     mask=ok[:, :, None] & (o < D)[None, None, :], other=0.0).to(tl.float32)  # (NB, LP, BD)
        do2 = tl.reshape(do, (NB * LP, BD))
        y2 = tl.reshape(tl.dot(p, xm, input_precision=PREC), (NB * LP, KP))
        tl.store(DWV + (pid * HEADS * J + h * J + j[:, None]) * D + o[None, :],
                 tl.dot(tl.trans(y2), do2, input_precision=PREC), mask=wmask)  # sum over pixels of y^T dout
        wvh = tl.load(WV + (h * J + j[:, None]) * D + o[None, :], mask=wmask, other=0.0).to(tl.float32)
        dy = tl.reshape(tl.dot(do2, tl.trans(wvh), input_precision=PREC), (NB, LP, KP))
        dxm += tl.dot(tl.trans(p, (0, 2, 1)), dy, input_precision=PREC)  # (NB, LP keys, KP)
        dp = tl.dot(dy, tl.trans(xm, (0, 2, 1)), input_precision=PREC)  # (NB, LP, LP)
        ds = p * (dp - tl.sum(p * dp, axis=2)[:, :, None])  # d logits
        du = tl.dot(ds, x3, input_precision=PREC)  # (NB, LP queries, KP)
        dx += tl.dot(tl.trans(ds, (0, 2, 1)), u, input_precision=PREC)  # key side
        dx += tl.dot(du, tl.broadcast_to(tl.trans(gh)[None, :, :], (NB, KP, KP)), input_precision=PREC)  # query side
        dgh = tl.dot(tl.trans(tl.reshape(x3, (NB * LP, KP))), tl.reshape(du, (NB * LP, KP)), input_precision=PREC)
        tl.store(DG + (pid * C + j[:, None]) * HEADS * C + h * C + j[None, :], dgh, mask=gmask)
    # values' inputs x_{j % C} * p(k, j // C): fold the J columns back onto channels and mixtures (0/1 matrices)
    fold_c = tl.where(((j[:, None] % C) == j[None, :]) & (j < J)[:, None], 1.0, 0.0)  # (KP j, KP c)
    dx += tl.dot(dxm * pmt[None, :, :], tl.broadcast_to(fold_c[None, :, :], (NB, KP, KP)), input_precision="ieee")
    dxpix, _ok = _pixels(sdx_b, sdx_h, sdx_w, NBLK, HB, WB, S, NB, LP)
    tl.store(DX + dxpix[:, :, None] + (j * sdx_c)[None, None, :], dx, mask=ok[:, :, None] & (j < C)[None, None, :])
    if HAS_PM:
        t = tl.sum(xr * dxm, axis=0)  # (LP, KP): summed over the blocks
        fold_m = tl.where(((j[:, None] // C) == j[None, :]) & (j < J)[:, None], 1.0, 0.0)  # (KP j, KP m)
        tl.store(DPM + pid * L * M + kk[:, None] * M + j[None, :], tl.dot(t, fold_m, input_precision="ieee"),
                 mask=(kk < L)[:, None] & (j < M)[None, :])


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _config(x, pm, wv, block: int, blocks_per_program: int, precision: str) -> dict:
    heads, _, D = wv.shape
    return dict(S=block, LP=16, C=x.shape[1], HEADS=heads, M=pm.shape[1] if pm is not None else 1, D=D,
                BD=max(16, _next_pow2(D)), HAS_PM=pm is not None, NB=blocks_per_program, KP=KP, PREC=precision)


def _grid(x, block: int, blocks_per_program: int) -> tuple[int, int, int, int]:
    B, _, H, W = x.shape
    n_blocks = B * (H // block) * (W // block)
    return n_blocks, H // block, W // block, triton.cdiv(n_blocks, blocks_per_program)


def precision(out_dtype: torch.dtype) -> str:
    """The dots' input precision: IEEE fp32 for fp32 results, TF32 (10-bit mantissa) for bf16 / fp16 ones."""
    return "ieee" if out_dtype == torch.float32 else "tf32"


def forward(x, g, pm, wv, block: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``(B, heads * D, H, W)`` contiguous in ``out_dtype`` from the image ``x`` ``(B, C, H, W)`` (any strides),
    ``g`` ``(C, heads * C)``, ``pm`` ``(L, M)`` or None, ``wv`` ``(heads, M * C, D)`` (contiguous)."""
    B, C, H, W = x.shape
    heads, _, D = wv.shape
    out = torch.empty((B, heads * D, H, W), dtype=out_dtype, device=x.device)
    n_blocks, hb, wb, programs = _grid(x, block, FWD_BLOCKS)
    if n_blocks:
        _stem_fwd_kernel[(programs,)](x, g, pm if pm is not None else g, wv, out, *x.stride(), *out.stride(),
                                      n_blocks, hb, wb, **_config(x, pm, wv, block, FWD_BLOCKS, precision(out_dtype)),
                                      num_warps=NUM_WARPS)
    return out


def backward(dout, x, g, pm, wv, block: int, out_dtype: torch.dtype):
    """``(dx, dg, dpm, dwv)`` in the dtypes of ``x, g, pm, wv``; dpm is None without ``pm``. Parameter gradients are
    the fixed-order sum of one fp32 partial per program. ``out_dtype``: the forward's (it sets the precision)."""
    B, C, H, W = x.shape
    heads, J, D = wv.shape
    cfg = _config(x, pm, wv, block, BWD_BLOCKS, precision(out_dtype))
    n_blocks, hb, wb, programs = _grid(x, block, BWD_BLOCKS)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dg = torch.zeros((max(programs, 1), C, heads * C), dtype=torch.float32, device=x.device)
    dpm = torch.zeros((max(programs, 1), block * block, cfg["M"]), dtype=torch.float32, device=x.device)
    dwv = torch.zeros((max(programs, 1), heads, J, D), dtype=torch.float32, device=x.device)
    if n_blocks:
        _stem_bwd_kernel[(programs,)](x, g, pm if pm is not None else g, wv, dout, dx, dg, dpm, dwv,
                                      *x.stride(), *dout.stride(), *dx.stride(), n_blocks, hb, wb, **cfg,
                                      num_warps=NUM_WARPS)
    return (dx, dg.sum(0).to(g.dtype), dpm.sum(0).to(pm.dtype) if pm is not None else None,
            dwv.sum(0).to(wv.dtype))
