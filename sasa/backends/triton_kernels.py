"""Triton kernels of the ``triton`` backend: fused forward, and a two-kernel deterministic backward.

Layout and maths as in ``sasa/functional.py``. Every kernel works on a tile of ``TH x TW`` pixels and ``HB``
heads of one image, held as a ``(TH*TW, HB, BD)`` register tile (``BD`` = head_dim rounded up to a power of two;
``HB`` heads per program, 1 unless ``TILES`` says otherwise), and walks the ``K x K`` window offsets in two run-time
loops (unrolling them cost 30-60 s of compile time and spilled registers), reading each shifted K / V / Q tile
straight from the (possibly strided) input: no window is ever materialised, neighbouring offsets and tiles hit
L1/L2. All arithmetic is fp32 whatever the input dtype; no ``tl.dot``, so head_dim 8 works. Grid: one program per
(batch, tile, head group), head groups varying fastest so the programs of one tile share its cache lines
(channels-last keeps a pixel's heads adjacent; with ``HB > 1`` one program reads ``HB * d`` adjacent channels of a
pixel). Offsets promise the compiler ``tl.multiple_of(.., VEC)`` (checked on the host from the strides) and, when
head_dim is a power of two (``EVEN_D``, see ``even_channels``), masks are constant along the channels, so a thread's
channels load as one vector (up to 16 bytes; SASS checked offline by ``tools/kernel_resources.py``) when the
layout gives a thread several channels of a pixel, which ``num_warps`` decides: a program of ``32 * num_warps``
threads spreads its ``TH*TW*HB*BD`` elements over them. Without ``EVEN_D`` (and in every kernel before it) the
channel mask made the compiler issue 2-byte loads. The relative tables arrive placed in zero-filled, contiguous
``(heads, K, BD)`` blocks (``_placed``: rows in channels ``[0, d/2)``, columns in ``[d/2, d)``, shared tables
repeated per head), so their rows load at compile-time strides, without masks, as vectors too.

- ``_fwd_kernel``: online softmax over the offsets; writes ``out`` (input dtype) and the per-(pixel, head)
  log-sum-exp ``lse`` (fp32, ``(B, heads, H, W)``) for the backward.
- ``_bwd_q_kernel`` (query-centric): ``delta = sum(dout * out)`` per query (stored for the next kernel), then per
  offset ``p = exp(logit - lse)``, ``ds = p * (dout . v_shift - delta) * scale``; ``dq = sum ds * (k_shift + r)``.
  The relative-table gradients are reduced inside the program and written as one ``(K, head_dim)`` partial per
  program (row part in channels ``[0, d/2)``, column part in ``[d/2, d)``); the host sums the partials. No atomics:
  results are bit-for-bit reproducible.
- ``_bwd_kv_kernel`` (key-centric): for every key pixel, the ``K x K`` queries whose windows contain it
  (``query = key - offset``, inside the image) recompute their logit and probability; ``dk = sum ds * q``,
  ``dv = sum p * dout``.

Borders: ``MASK=False`` ("zeros") keeps out-of-image offsets in the softmax with k = v = 0 (logit ``scale * q . r``);
``MASK=True`` ("mask") gives them probability 0.

This module is plain Triton. ``triton_backend`` loads it lazily, once per mode: compiled for CUDA tensors,
interpreted (``TRITON_INTERPRET=1``) for CPU tensors. Do not import it from elsewhere.

Tile sizes measured on an H200 (``TILES``), heads per program (``HB``) compiled and tested but not
yet timed on a GPU (``tools/tile_sweep.py --heads``; ``tools/kernel_resources.py`` gives registers and spills
offline). Not yet at the hardware limit: each offset re-reads its shifted K / V tile through L1 (no shared-memory
staging, no tensor cores), see BENCHMARKS.md."""


import functools

import torch
import triton
import triton.language as tl

# (TH, TW, num_warps[, HB]) per padded head_dim and kernel, measured on an H200 (bf16, batch 64, K=7, ResNet-50
# stage shapes; tools/tile_sweep.py, BENCHMARKS.md). 8x8 tiles win almost everywhere: a 14x14 halo of K/V rows stays
# in L1, where 16x16 tiles (the first guess) thrashed it and ran 3-4x slower at head_dim 8. HB (heads per program,
# default 1) is not measured yet: the sweep's --heads option times it.
TILES = {
    8: {"fwd": (8, 8, 8), "bwd_q": (8, 8, 8), "bwd_kv": (8, 8, 8)},
    16: {"fwd": (8, 8, 2), "bwd_q": (8, 16, 2), "bwd_kv": (8, 16, 2)},
    32: {"fwd": (8, 8, 2), "bwd_q": (8, 8, 2), "bwd_kv": (8, 8, 2)},
    64: {"fwd": (4, 8, 4), "bwd_q": (4, 8, 2), "bwd_kv": (4, 8, 2)},
}
# Set to (TH, TW) (powers of two) to force a tile shape, e.g. from tests (multi-tile borders).
TILE_OVERRIDE = None
# Set to a power of two to force the heads per program (HB), e.g. from tests or the sweep.
HEADS_OVERRIDE = None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def even_channels(d: int, block_d: int) -> bool:
    """``EVEN_D``: head_dim fills its power-of-two block, so no channel mask, and a thread's channels load as one
    vector."""
    return d == block_d


def heads_per_program(heads: int, wanted: int) -> int:
    """The largest power of two <= ``wanted`` that divides ``heads`` (head groups never straddle the last head)."""
    hb = 1
    while hb * 2 <= wanted and heads % (hb * 2) == 0:
        hb *= 2
    return hb


def tile_config(H: int, W: int, block_d: int, kind: str, heads: int = 1) -> tuple[int, int, int, int]:
    """``(TH, TW, num_warps, HB)`` for a map of ``H x W``, padded head_dim ``block_d`` and ``heads`` heads."""
    th, tw, num_warps, *rest = TILES[min(max(block_d, 8), 64)][kind]
    hb = rest[0] if rest else 1
    if block_d > 64:  # 128: halve the tile to keep the per-thread register tile of the 64 entry
        th, num_warps = max(1, th // 2), max(num_warps, 4)
    if TILE_OVERRIDE is not None:
        th, tw = TILE_OVERRIDE
    if HEADS_OVERRIDE is not None:
        hb = HEADS_OVERRIDE
    hb = heads_per_program(heads, hb)
    th, tw = min(th, _next_pow2(H)), min(tw, _next_pow2(W))  # small maps: no empty tile rows / columns
    num_warps = max(1, min(num_warps, th * tw * hb * block_d // 32))  # at least one element per thread
    return th, tw, 1 << (num_warps.bit_length() - 1), hb


@triton.jit
def _program_tile(HEADS, N_TILES, TILES_W, TH: tl.constexpr, TW: tl.constexpr, HB: tl.constexpr,
                  INT64: tl.constexpr):
    """``(batch (int64), heads (HB,), tile, rows (P,), columns (P,))`` of this program's tile of pixels."""
    pid = tl.program_id(0)  # head groups vary fastest: the programs of one tile share its cache lines
    groups = HEADS // HB
    tile = (pid // groups) % N_TILES
    bi = (pid // (groups * N_TILES)).to(tl.int64)
    heads = (pid % groups) * HB + tl.arange(0, HB)
    offs = tl.arange(0, TH * TW)
    i = (tile // TILES_W) * TH + offs // TW
    j = (tile % TILES_W) * TW + offs % TW
    if INT64:
        i = i.to(tl.int64)
        j = j.to(tl.int64)
    return bi, heads, tile, i, j


@triton.jit
def _ptrs(base, bi, s_b, i, j, s_h, s_w, heads, s_n, ch, s_d, VEC: tl.constexpr):
    """``(P, HB, BD)`` pointers to pixels ``(i, j)``, ``heads`` and channels ``ch`` of a (B, H, W, heads, d) tensor;
    every offset but the channel's is promised to be a multiple of ``VEC`` (vector loads)."""
    row = tl.multiple_of(i * s_h + j * s_w, VEC)[:, None] + tl.multiple_of(heads * s_n, VEC)[None, :]
    return base + tl.multiple_of(bi * s_b, VEC) + row[:, :, None] + ch[None, None, :] * s_d


@triton.jit
def _mask(pix_ok, ch, D, EVEN_D: tl.constexpr):
    """Load / store mask of a ``(P, HB, BD)`` tile: pixel validity, and ``ch < D`` unless ``D == BD``. A mask that
    varies along the channels keeps the compiler from vectorising the loads (it issued 2-byte loads at head_dim 8)."""
    mask = pix_ok[:, None, None]
    if not EVEN_D:
        mask = mask & (ch < D)[None, None, :]
    return mask


@triton.jit
def _table_row(RR, heads, a, ch, HAS: tl.constexpr, KS: tl.constexpr, HB: tl.constexpr, BD: tl.constexpr):
    """``(HB, BD)``: row ``a`` of the row table, placed on the host (``_placed``) in a contiguous ``(heads, KS, BD)``
    block, channels ``[0, d/2)``, zeros elsewhere: compile-time strides and no mask, so the load vectorises; zeros
    without a table."""
    if HAS:
        return tl.load(RR + (heads[:, None] * KS + a) * BD + ch[None, :]).to(tl.float32)
    return tl.zeros([HB, BD], tl.float32)


@triton.jit
def _table_col(RC, heads, b, ch, KS: tl.constexpr, BD: tl.constexpr):
    """``(HB, BD)``: row ``b`` of the column table, placed as the row table's but in channels ``[d/2, d)``."""
    return tl.load(RC + (heads[:, None] * KS + b) * BD + ch[None, :]).to(tl.float32)


@triton.jit
def _fwd_kernel(
    Q, Kt, V, RR, RC, O, LSE,
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    so_b, so_h, so_w, so_n, so_d,
    HEADS, H, W, D, TILES_W, N_TILES, scale,
    KS: tl.constexpr, MASK: tl.constexpr, HAS_K: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_COLS: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BD: tl.constexpr, EVEN_D: tl.constexpr, HB: tl.constexpr,
    INT64: tl.constexpr,
    VEC: tl.constexpr,
):
    R: tl.constexpr = KS // 2
    P: tl.constexpr = TH * TW
    bi, hd, tile, i, j = _program_tile(HEADS, N_TILES, TILES_W, TH, TW, HB, INT64)
    ch = tl.arange(0, BD)
    in_img = (i < H) & (j < W)
    own = _mask(in_img, ch, D, EVEN_D)
    q = tl.load(_ptrs(Q, bi, sq_b, i, j, sq_h, sq_w, hd, sq_n, ch, sq_d, VEC), mask=own,
                other=0.0).to(tl.float32)  # (P, HB, BD)

    m = tl.full([P, HB], -1.0e30, tl.float32)  # running max (finite: masked offsets are -inf)
    l_sum = tl.zeros([P, HB], tl.float32)
    acc = tl.zeros([P, HB, BD], tl.float32)
    for a in range(KS):
        ii = i + (a - R)
        row_ok = (ii >= 0) & (ii < H)
        rrow = _table_row(RR, hd, a, ch, HAS_ROWS, KS, HB, BD)
        for b in range(KS):
            jj = j + (b - R)
            ok = row_ok & (jj >= 0) & (jj < W)  # (P,) key inside the image
            ld = _mask(ok, ch, D, EVEN_D)
            t = tl.zeros([P, HB, BD], tl.float32)
            if HAS_K:
                t = tl.load(_ptrs(Kt, bi, sk_b, ii, jj, sk_h, sk_w, hd, sk_n, ch, sk_d, VEC), mask=ld,
                            other=0.0).to(tl.float32)
            if HAS_ROWS or HAS_COLS:
                rel = rrow
                if HAS_COLS:
                    rel = rrow + _table_col(RC, hd, b, ch, KS, BD)
                t = t + rel[None, :, :]
            s = tl.sum(q * t, axis=2) * scale  # (P, HB) logits
            if MASK:
                s = tl.where(ok[:, None], s, float("-inf"))
            vv = tl.load(_ptrs(V, bi, sv_b, ii, jj, sv_h, sv_w, hd, sv_n, ch, sv_d, VEC), mask=ld,
                         other=0.0).to(tl.float32)
            m_new = tl.maximum(m, s)
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new)
            l_sum = l_sum * alpha + p
            acc = acc * alpha[:, :, None] + p[:, :, None] * vv
            m = m_new
    l_safe = tl.where(l_sum > 0, l_sum, 1.0)  # only out-of-image tile pixels can have l_sum == 0
    tl.store(_ptrs(O, bi, so_b, i, j, so_h, so_w, hd, so_n, ch, so_d, VEC), acc / l_safe[:, :, None], mask=own)
    tl.store(LSE + (bi * HEADS + hd[None, :]) * H * W + (i * W + j)[:, None], m + tl.log(l_safe),
             mask=in_img[:, None])


@triton.jit
def _bwd_q_kernel(
    Q, Kt, V, O, DO, LSE, DELTA, DQ, DREL, RR, RC,
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    so_b, so_h, so_w, so_n, so_d,
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d,
    sdq_b, sdq_h, sdq_w, sdq_n, sdq_d,
    B, HEADS, H, W, D, HALF, TILES_W, N_TILES, scale,
    KS: tl.constexpr, KP: tl.constexpr, MASK: tl.constexpr, HAS_K: tl.constexpr,
    HAS_ROWS: tl.constexpr, HAS_COLS: tl.constexpr, ROW_GRAD: tl.constexpr, COL_GRAD: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BD: tl.constexpr, EVEN_D: tl.constexpr, HB: tl.constexpr,
    INT64: tl.constexpr,
    VEC: tl.constexpr,
):
    R: tl.constexpr = KS // 2
    P: tl.constexpr = TH * TW
    bi, hd, tile, i, j = _program_tile(HEADS, N_TILES, TILES_W, TH, TW, HB, INT64)
    ch = tl.arange(0, BD)
    in_img = (i < H) & (j < W)
    own = _mask(in_img, ch, D, EVEN_D)

    q = tl.load(_ptrs(Q, bi, sq_b, i, j, sq_h, sq_w, hd, sq_n, ch, sq_d, VEC), mask=own, other=0.0).to(tl.float32)
    do = tl.load(_ptrs(DO, bi, sdo_b, i, j, sdo_h, sdo_w, hd, sdo_n, ch, sdo_d, VEC), mask=own,
                 other=0.0).to(tl.float32)
    o = tl.load(_ptrs(O, bi, so_b, i, j, so_h, so_w, hd, so_n, ch, so_d, VEC), mask=own, other=0.0).to(tl.float32)
    delta = tl.sum(do * o, axis=2)  # (P, HB) sum_ab p_ab dp_ab
    plane = (bi * HEADS + hd[None, :]) * H * W + (i * W + j)[:, None]  # (P, HB) index into (B, heads, H, W)
    tl.store(DELTA + plane, delta, mask=in_img[:, None])
    lse = tl.load(LSE + plane, mask=in_img[:, None], other=0.0)

    kidx = tl.arange(0, KP)
    dq = tl.zeros([P, HB, BD], tl.float32)
    g_rows = tl.zeros([KP, HB, BD], tl.float32)  # row-table gradient partial (channels < HALF used)
    s_cols = tl.zeros([P, HB, KP], tl.float32)  # per pixel and head, sum over row offsets of ds, per column offset
    for a in range(KS):
        ii = i + (a - R)
        row_ok = (ii >= 0) & (ii < H)
        rrow = _table_row(RR, hd, a, ch, HAS_ROWS, KS, HB, BD)
        s_row = tl.zeros([P, HB], tl.float32)  # per pixel and head, sum over column offsets of ds
        for b in range(KS):
            jj = j + (b - R)
            ok = row_ok & (jj >= 0) & (jj < W)
            ld = _mask(ok, ch, D, EVEN_D)
            t = tl.zeros([P, HB, BD], tl.float32)
            if HAS_K:
                t = tl.load(_ptrs(Kt, bi, sk_b, ii, jj, sk_h, sk_w, hd, sk_n, ch, sk_d, VEC), mask=ld,
                            other=0.0).to(tl.float32)
            if HAS_ROWS or HAS_COLS:
                rel = rrow
                if HAS_COLS:
                    rel = rrow + _table_col(RC, hd, b, ch, KS, BD)
                t = t + rel[None, :, :]
            s = tl.sum(q * t, axis=2) * scale
            p = tl.exp(s - lse)
            if MASK:
                p = tl.where(ok[:, None], p, 0.0)
            vv = tl.load(_ptrs(V, bi, sv_b, ii, jj, sv_h, sv_w, hd, sv_n, ch, sv_d, VEC), mask=ld,
                         other=0.0).to(tl.float32)
            ds = p * (tl.sum(do * vv, axis=2) - delta) * scale  # (P, HB) d loss / d raw logit
            dq += ds[:, :, None] * t
            if ROW_GRAD:
                s_row += ds
            if COL_GRAD:
                s_cols += tl.where(kidx[None, None, :] == b, ds[:, :, None], 0.0)
        if ROW_GRAD:
            g = tl.sum(s_row[:, :, None] * q, axis=0)  # (HB, BD)
            g_rows += tl.where(kidx[:, None, None] == a, g[None, :, :], 0.0)

    tl.store(_ptrs(DQ, bi, sdq_b, i, j, sdq_h, sdq_w, hd, sdq_n, ch, sdq_d, VEC), dq, mask=own)
    if ROW_GRAD or COL_GRAD:
        g_all = g_rows
        if COL_GRAD:
            g_cols = tl.zeros([KP, HB, BD], tl.float32)
            for b in range(KS):
                col = tl.sum(tl.where(kidx[None, None, :] == b, s_cols, 0.0), axis=2)  # (P, HB)
                g = tl.sum(col[:, :, None] * q, axis=0)  # (HB, BD)
                g_cols += tl.where(kidx[:, None, None] == b, g[None, :, :], 0.0)
            g_all = tl.where(ch[None, None, :] < HALF, g_rows, g_cols)
        # DREL: (HEADS, B, N_TILES, KS, D) fp32 partials, summed on the host
        prog = (hd * B + bi) * N_TILES + tile  # (HB,)
        tl.store(DREL + prog[None, :, None] * KS * D + kidx[:, None, None] * D + ch[None, None, :], g_all,
                 mask=(kidx < KS)[:, None, None] & (ch < D)[None, None, :])


@triton.jit
def _bwd_kv_kernel(
    Q, Kt, V, DO, LSE, DELTA, DK, DV, RR, RC,
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d,
    sdk_b, sdk_h, sdk_w, sdk_n, sdk_d,
    sdv_b, sdv_h, sdv_w, sdv_n, sdv_d,
    HEADS, H, W, D, TILES_W, N_TILES, scale,
    KS: tl.constexpr, HAS_K: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_COLS: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BD: tl.constexpr, EVEN_D: tl.constexpr, HB: tl.constexpr,
    INT64: tl.constexpr,
    VEC: tl.constexpr,
):
    R: tl.constexpr = KS // 2
    P: tl.constexpr = TH * TW
    bi, hd, tile, i, j = _program_tile(HEADS, N_TILES, TILES_W, TH, TW, HB, INT64)  # (i, j): key pixels
    ch = tl.arange(0, BD)
    in_img = (i < H) & (j < W)
    own = _mask(in_img, ch, D, EVEN_D)

    kk = tl.zeros([P, HB, BD], tl.float32)
    if HAS_K:
        kk = tl.load(_ptrs(Kt, bi, sk_b, i, j, sk_h, sk_w, hd, sk_n, ch, sk_d, VEC), mask=own,
                     other=0.0).to(tl.float32)
    vv = tl.load(_ptrs(V, bi, sv_b, i, j, sv_h, sv_w, hd, sv_n, ch, sv_d, VEC), mask=own, other=0.0).to(tl.float32)
    planes = (bi * HEADS + hd[None, :]) * H * W  # (1, HB)
    dk = tl.zeros([P, HB, BD], tl.float32)
    dv = tl.zeros([P, HB, BD], tl.float32)
    for a in range(KS):
        qi = i - (a - R)  # the query that sees this key at row offset a
        row_ok = (qi >= 0) & (qi < H) & in_img
        rrow = _table_row(RR, hd, a, ch, HAS_ROWS, KS, HB, BD)
        for b in range(KS):
            qj = j - (b - R)
            ok = row_ok & (qj >= 0) & (qj < W)  # (P,) query inside the image
            ld = _mask(ok, ch, D, EVEN_D)
            t = kk
            if HAS_ROWS or HAS_COLS:
                rel = rrow
                if HAS_COLS:
                    rel = rrow + _table_col(RC, hd, b, ch, KS, BD)
                t = t + rel[None, :, :]
            qs = tl.load(_ptrs(Q, bi, sq_b, qi, qj, sq_h, sq_w, hd, sq_n, ch, sq_d, VEC), mask=ld,
                         other=0.0).to(tl.float32)
            dos = tl.load(_ptrs(DO, bi, sdo_b, qi, qj, sdo_h, sdo_w, hd, sdo_n, ch, sdo_d, VEC), mask=ld,
                          other=0.0).to(tl.float32)
            at = planes + (qi * W + qj)[:, None]  # (P, HB)
            lse = tl.load(LSE + at, mask=ok[:, None], other=0.0)
            s = tl.sum(qs * t, axis=2) * scale
            p = tl.where(ok[:, None], tl.exp(s - lse), 0.0)
            dv += p[:, :, None] * dos
            if HAS_K:
                delta = tl.load(DELTA + at, mask=ok[:, None], other=0.0)
                ds = p * (tl.sum(dos * vv, axis=2) - delta) * scale
                dk += ds[:, :, None] * qs

    if HAS_K:
        tl.store(_ptrs(DK, bi, sdk_b, i, j, sdk_h, sdk_w, hd, sdk_n, ch, sdk_d, VEC), dk, mask=own)
    tl.store(_ptrs(DV, bi, sdv_b, i, j, sdv_h, sdv_w, hd, sdv_n, ch, sdv_d, VEC), dv, mask=own)


# ----------------------------------------------------------------------------------------------------------------
# Launch helpers (host side)
# ----------------------------------------------------------------------------------------------------------------

_INT32_MAX = 2**31 - 1


def _needs_int64(*tensors) -> bool:
    """True when an in-image offset (everything but the batch term) could overflow int32."""
    for t in tensors:
        if t is not None and t.dim() == 5:
            extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))
            if 2 * extent + 2**20 > _INT32_MAX:  # halo rows/columns of the last tile reach past the extent
                return True
    return False


class _Layout:
    """Shape, strides and element size of a tensor (``strides`` None: contiguous), for ``_vector_width`` and
    ``_needs_int64`` on the host without the tensor."""

    def __init__(self, shape: tuple[int, ...], strides: tuple[int, ...] | None, element_size: int):
        self.shape = shape
        if strides is None:
            strides, step = [], 1
            for size in reversed(shape):
                strides.insert(0, step)
                step *= size
        self._strides, self._element_size = tuple(strides), element_size

    def stride(self) -> tuple[int, ...]:
        return self._strides

    def dim(self) -> int:
        return len(self.shape)

    def element_size(self) -> int:
        return self._element_size


def _vector_width(block_d: int, *tensors) -> int:
    """Elements per vector access (``VEC``) that every pixel / head / batch offset of ``tensors`` is a multiple of.

    The kernels promise ``tl.multiple_of(offset, VEC)`` to the compiler, which then issues 16-byte loads; the
    promise must hold, so any unit-stride violation or odd stride lowers it (to 1: scalar loads, still correct).
    """
    vec = min(block_d, 16 // tensors[0].element_size())
    for t in tensors:
        if t is None:
            continue
        strides = _strides(t)
        if t.shape[-1] > 1 and strides[-1] != 1:
            return 1
        for stride in strides[:-1]:
            while stride % vec:
                vec //= 2
    return max(vec, 1)


def _strides(t) -> tuple[int, ...]:
    """Strides with 0 for size-1 dimensions (never stepped inside the image; keeps ``VEC`` honest and high)."""
    return tuple(stride if size > 1 else 0 for size, stride in zip(t.shape, t.stride()))


def _placed(table, start: int, block_d: int, heads: int):
    """A ``(K, w)`` (shared) or ``(heads, K, w)`` table as a contiguous ``(heads, K, block_d)`` block of zeros with
    the table in channels ``[start, start + w)``: rows at 0, columns at d/2. The kernels then load whole channel
    blocks at compile-time strides, without a mask."""
    if table is None:
        return None
    out = table.new_zeros(heads, table.shape[-2], block_d)
    out[..., start:start + table.shape[-1]] = table
    return out


def launch_config(q, k, v) -> dict:
    """The host's choices for a call on these tensors: ``{"fwd" | "bwd_q" | "bwd_kv": (TH, TW, num_warps, HB),
    "vec": VEC, "int64": INT64}``. With the dtypes, head_dim, kernel size, padding and which of k and the tables
    are present, they fix every compile-time constant of the three kernels (``sasa.backends.selfcheck`` keys its
    verdicts on them); forward and backward of one call share them (``backward`` copies an upstream gradient that
    does not fit them). Memoised per layout (shape, strides, element size), overrides and ``tile_config`` (which the
    tuning tools replace); do not modify the result."""
    return _launch_config(tuple(q.shape), q.stride(), None if k is None else k.stride(), v.stride(), q.element_size(),
                          TILE_OVERRIDE, HEADS_OVERRIDE, tile_config)


@functools.lru_cache(maxsize=1024)
def _launch_config(shape, q_strides, k_strides, v_strides, element_size: int, _tile_override, _heads_override,
                   tiles):
    B, H, W, heads, d = shape
    bd = _next_pow2(d)
    q = _Layout(shape, q_strides, element_size)
    k = _Layout(shape, k_strides, element_size) if k_strides is not None else None
    v = _Layout(shape, v_strides, element_size)
    out = _Layout(shape, None, element_size)  # the outputs' (out, dq, dk, dv) layout: contiguous
    config = {kind: tiles(H, W, bd, kind, heads) for kind in ("fwd", "bwd_q", "bwd_kv")}
    config["vec"] = _vector_width(bd, q, k, v, out)
    config["int64"] = _needs_int64(q, k if k is not None else q, v, out)
    return config


def forward(q, k, v, rel_rows, rel_cols, kernel_size: int, mask: bool, scale: float, config: dict | None = None):
    """Returns ``(out, lse)``: out ``(B, H, W, heads, d)`` contiguous in q's dtype, lse ``(B, heads, H, W)`` fp32.
    ``config``: ``launch_config``'s choices, computed from the tensors when None (the self-check passes those of
    the call it stands in for)."""
    B, H, W, heads, d = q.shape
    out = torch.empty((B, H, W, heads, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, heads, H, W), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    config = config or launch_config(q, k, v)
    bd = _next_pow2(d)
    th, tw, num_warps, hb = config["fwd"]
    tiles_w = triton.cdiv(W, tw)
    n_tiles = triton.cdiv(H, th) * tiles_w
    kt = k if k is not None else q  # dummy pointer, never read
    pr, pc = _placed(rel_rows, 0, bd, heads), _placed(rel_cols, d // 2, bd, heads)
    _fwd_kernel[(B * n_tiles * (heads // hb),)](
        q, kt, v, pr if pr is not None else q, pc if pc is not None else q, out, lse,
        *_strides(q), *_strides(kt), *_strides(v), *_strides(out),
        heads, H, W, d, tiles_w, n_tiles, float(scale),
        KS=kernel_size, MASK=bool(mask), HAS_K=k is not None, HAS_ROWS=rel_rows is not None,
        HAS_COLS=rel_cols is not None, TH=th, TW=tw, BD=bd, EVEN_D=even_channels(d, bd), HB=hb,
        INT64=config["int64"], VEC=config["vec"], num_warps=num_warps,
    )
    return out, lse


def backward(dout, q, k, v, out, lse, rel_rows, rel_cols, kernel_size: int, mask: bool, scale: float,
             need_kv: bool = True, need_rows: bool = True, need_cols: bool = True, config: dict | None = None):
    """Returns ``(dq, dk, dv, drows, dcols)``; dk is None without k, d-tables None when absent or not needed.
    ``config``: as ``forward``'s."""
    B, H, W, heads, d = q.shape
    dq = torch.empty((B, H, W, heads, d), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq) if (k is not None and need_kv) else None
    dv = torch.empty_like(dq) if need_kv else None
    row_grad = rel_rows is not None and need_rows
    col_grad = rel_cols is not None and need_cols
    if dq.numel() == 0:
        z = [torch.zeros_like(t) if (t is not None and n) else None
             for t, n in ((rel_rows, row_grad), (rel_cols, col_grad))]
        return dq, dk, (torch.zeros_like(dq) if need_kv else None), z[0], z[1]
    bd = _next_pow2(d)
    kt = k if k is not None else q
    pr, pc = _placed(rel_rows, 0, bd, heads), _placed(rel_cols, d // 2, bd, heads)
    rr = pr if pr is not None else q
    rc = pc if pc is not None else q
    config = config or launch_config(q, k, v)
    vec, int64 = config["vec"], config["int64"]
    if _vector_width(bd, dout) < vec or (not int64 and _needs_int64(dout)):  # e.g. a permuted upstream gradient:
        dout = dout.contiguous()  # one copy beats scalar loads everywhere (and keeps int32 offsets valid)
    delta = torch.empty((B, heads, H, W), dtype=torch.float32, device=q.device)

    th, tw, num_warps, hb = config["bwd_q"]
    tiles_w = triton.cdiv(W, tw)
    n_tiles = triton.cdiv(H, th) * tiles_w
    drel = torch.empty((heads, B, n_tiles, kernel_size, d) if (row_grad or col_grad) else (1,),
                       dtype=torch.float32, device=q.device)
    _bwd_q_kernel[(B * n_tiles * (heads // hb),)](
        q, kt, v, out, dout, lse, delta, dq, drel, rr, rc,
        *_strides(q), *_strides(kt), *_strides(v), *_strides(out), *_strides(dout), *_strides(dq),
        B, heads, H, W, d, d // 2, tiles_w, n_tiles, float(scale),
        KS=kernel_size, KP=_next_pow2(kernel_size), MASK=bool(mask), HAS_K=k is not None,
        HAS_ROWS=rel_rows is not None, HAS_COLS=rel_cols is not None, ROW_GRAD=row_grad, COL_GRAD=col_grad,
        TH=th, TW=tw, BD=bd, EVEN_D=even_channels(d, bd), HB=hb, INT64=int64, VEC=vec, num_warps=num_warps,
    )
    drows = dcols = None
    if row_grad or col_grad:
        per_head = drel.sum(dim=(1, 2))  # (heads, K, d), a fixed-order reduction: deterministic
        if row_grad:
            g = per_head[..., : d // 2]
            drows = (g if rel_rows.dim() == 3 else g.sum(0)).to(rel_rows.dtype, copy=True)  # no aliasing outputs
        if col_grad:
            g = per_head[..., d // 2:]
            dcols = (g if rel_cols.dim() == 3 else g.sum(0)).to(rel_cols.dtype, copy=True)

    if need_kv:
        th, tw, num_warps, hb = config["bwd_kv"]
        tiles_w = triton.cdiv(W, tw)
        n_tiles = triton.cdiv(H, th) * tiles_w
        dkt = dk if dk is not None else dv
        _bwd_kv_kernel[(B * n_tiles * (heads // hb),)](
            q, kt, v, dout, lse, delta, dkt, dv, rr, rc,
            *_strides(q), *_strides(kt), *_strides(v), *_strides(dout), *_strides(dkt), *_strides(dv),
                heads, H, W, d, tiles_w, n_tiles, float(scale),
            KS=kernel_size, HAS_K=k is not None, HAS_ROWS=rel_rows is not None, HAS_COLS=rel_cols is not None,
            TH=th, TW=tw, BD=bd, EVEN_D=even_channels(d, bd), HB=hb, INT64=int64, VEC=vec, num_warps=num_warps,
        )
    return dq, dk, dv, drows, dcols
