"""Triton kernels of the ``triton`` backend: fused forward, and a two-kernel deterministic backward.

Layout and maths as in ``sasa/functional.py``. Every kernel works on a tile of ``TH x TW`` pixels of one
(batch, head) plane, held as a ``(TH*TW, BD)`` register tile (``BD`` = head_dim rounded up to a power of two), and
walks the ``K x K`` window offsets in two run-time loops (unrolling them cost 30-60 s of compile time and spilled
registers), reading each shifted K / V / Q tile straight from the (possibly strided) input: no window is ever
materialised, neighbouring offsets and tiles hit L1/L2. All arithmetic is fp32 whatever the input dtype; no
``tl.dot``, so head_dim 8 works. Grid: one program per (batch, tile, head), heads varying fastest so the programs
of one tile share its cache lines (channels-last keeps a pixel's heads adjacent). Offsets promise the compiler
``tl.multiple_of(.., VEC)`` (checked on the host from the strides) so loads are 16-byte vectors.

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

Status: complete; tile sizes measured on an H200 (``TILES``). Not yet at the hardware limit: each offset re-reads
its shifted K / V tile through L1 (no shared-memory staging, no tensor cores), see BENCHMARKS.md.
"""


import torch
import triton
import triton.language as tl

# (TH, TW, num_warps) per padded head_dim and kernel, measured on an H200 (bf16, batch 64, K=7, ResNet-50 stage
# shapes; tools/tile_sweep.py, BENCHMARKS.md). 8x8 tiles win almost everywhere: a 14x14 halo of K/V rows stays in
# L1, where 16x16 tiles (the first guess) thrashed it and ran 3-4x slower at head_dim 8.
TILES = {
    8: {"fwd": (8, 8, 8), "bwd_q": (8, 8, 8), "bwd_kv": (8, 8, 8)},
    16: {"fwd": (8, 8, 2), "bwd_q": (8, 16, 2), "bwd_kv": (8, 16, 2)},
    32: {"fwd": (8, 8, 2), "bwd_q": (8, 8, 2), "bwd_kv": (8, 8, 2)},
    64: {"fwd": (4, 8, 4), "bwd_q": (4, 8, 2), "bwd_kv": (4, 8, 2)},
}
# Set to (TH, TW) (powers of two) to force a tile shape, e.g. from tests (multi-tile borders).
TILE_OVERRIDE = None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def tile_config(H: int, W: int, block_d: int, kind: str) -> tuple[int, int, int]:
    """``(TH, TW, num_warps)`` for a map of ``H x W`` and padded head_dim ``block_d``."""
    th, tw, num_warps = TILES[min(max(block_d, 8), 64)][kind]
    if block_d > 64:  # 128: halve the tile to keep the per-thread register tile of the 64 entry
        th, num_warps = max(1, th // 2), max(num_warps, 4)
    if TILE_OVERRIDE is not None:
        th, tw = TILE_OVERRIDE
    th, tw = min(th, _next_pow2(H)), min(tw, _next_pow2(W))  # small maps: no empty tile rows / columns
    num_warps = max(1, min(num_warps, th * tw * block_d // 32))  # at least one element per thread
    return th, tw, 1 << (num_warps.bit_length() - 1)


@triton.jit
def _fwd_kernel(
    Q, Kt, V, RR, RC, O, LSE,
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    so_b, so_h, so_w, so_n, so_d,
    srr_n, srr_k, srr_c,
    src_n, src_k, src_c,
    HEADS, H, W, D, HALF, TILES_W, N_TILES, scale,
    KS: tl.constexpr, MASK: tl.constexpr, HAS_K: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_COLS: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BD: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr,
):
    R: tl.constexpr = KS // 2
    pid = tl.program_id(0)  # heads vary fastest: the programs of one tile share its cache lines
    head = pid % HEADS
    tile = (pid // HEADS) % N_TILES
    bi = (pid // (HEADS * N_TILES)).to(tl.int64)
    offs = tl.arange(0, TH * TW)
    i = (tile // TILES_W) * TH + offs // TW  # (P,) query rows
    j = (tile % TILES_W) * TW + offs % TW  # (P,) query columns
    if INT64:
        i = i.to(tl.int64)
        j = j.to(tl.int64)
    ch = tl.arange(0, BD)
    ch_ok = ch < D
    in_img = (i < H) & (j < W)

    q_base = Q + tl.multiple_of(bi * sq_b + head * sq_n, VEC)
    k_base = Kt + tl.multiple_of(bi * sk_b + head * sk_n, VEC)
    v_base = V + tl.multiple_of(bi * sv_b + head * sv_n, VEC)
    q = tl.load(q_base + tl.multiple_of(i * sq_h + j * sq_w, VEC)[:, None] + ch[None, :] * sq_d,
                mask=in_img[:, None] & ch_ok[None, :], other=0.0).to(tl.float32)  # (P, BD)

    m = tl.full([TH * TW], -1.0e30, tl.float32)  # running max (finite: masked offsets are -inf)
    l_sum = tl.zeros([TH * TW], tl.float32)
    acc = tl.zeros([TH * TW, BD], tl.float32)
    for a in range(KS):
        ii = i + (a - R)
        row_ok = (ii >= 0) & (ii < H)
        rrow = tl.zeros([BD], tl.float32)
        if HAS_ROWS:
            rrow = tl.load(RR + head * srr_n + a * srr_k + ch * srr_c, mask=ch < HALF, other=0.0).to(tl.float32)
        for b in range(KS):
            jj = j + (b - R)
            ok = row_ok & (jj >= 0) & (jj < W)  # (P,) key inside the image
            ld = ok[:, None] & ch_ok[None, :]
            t = tl.zeros([TH * TW, BD], tl.float32)
            if HAS_K:
                t = tl.load(k_base + tl.multiple_of(ii * sk_h + jj * sk_w, VEC)[:, None] + ch[None, :] * sk_d,
                            mask=ld, other=0.0).to(tl.float32)
            if HAS_ROWS or HAS_COLS:
                rel = rrow
                if HAS_COLS:
                    rel = rrow + tl.load(RC + head * src_n + b * src_k + (ch - HALF) * src_c,
                                   mask=(ch >= HALF) & ch_ok, other=0.0).to(tl.float32)
                t = t + rel[None, :]
            s = tl.sum(q * t, axis=1) * scale  # (P,) logits
            if MASK:
                s = tl.where(ok, s, float("-inf"))
            vv = tl.load(v_base + tl.multiple_of(ii * sv_h + jj * sv_w, VEC)[:, None] + ch[None, :] * sv_d,
                         mask=ld, other=0.0).to(tl.float32)
            m_new = tl.maximum(m, s)
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new)
            l_sum = l_sum * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * vv
            m = m_new
    l_safe = tl.where(l_sum > 0, l_sum, 1.0)  # only out-of-image tile pixels can have l_sum == 0
    out = acc / l_safe[:, None]
    o_base = O + tl.multiple_of(bi * so_b + head * so_n, VEC)
    tl.store(o_base + tl.multiple_of(i * so_h + j * so_w, VEC)[:, None] + ch[None, :] * so_d, out,
             mask=in_img[:, None] & ch_ok[None, :])
    lse_base = LSE + (bi * HEADS + head) * H * W
    tl.store(lse_base + i * W + j, m + tl.log(l_safe), mask=in_img)


@triton.jit
def _bwd_q_kernel(
    Q, Kt, V, O, DO, LSE, DELTA, DQ, DREL, RR, RC,
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    so_b, so_h, so_w, so_n, so_d,
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d,
    sdq_b, sdq_h, sdq_w, sdq_n, sdq_d,
    srr_n, srr_k, srr_c,
    src_n, src_k, src_c,
    B, HEADS, H, W, D, HALF, TILES_W, N_TILES, scale,
    KS: tl.constexpr, KP: tl.constexpr, MASK: tl.constexpr, HAS_K: tl.constexpr,
    HAS_ROWS: tl.constexpr, HAS_COLS: tl.constexpr, ROW_GRAD: tl.constexpr, COL_GRAD: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BD: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr,
):
    R: tl.constexpr = KS // 2
    pid = tl.program_id(0)  # heads vary fastest: the programs of one tile share its cache lines
    head = pid % HEADS
    tile = (pid // HEADS) % N_TILES
    bi = (pid // (HEADS * N_TILES)).to(tl.int64)
    offs = tl.arange(0, TH * TW)
    i = (tile // TILES_W) * TH + offs // TW
    j = (tile % TILES_W) * TW + offs % TW
    if INT64:
        i = i.to(tl.int64)
        j = j.to(tl.int64)
    ch = tl.arange(0, BD)
    ch_ok = ch < D
    in_img = (i < H) & (j < W)
    own = in_img[:, None] & ch_ok[None, :]

    q_base = Q + tl.multiple_of(bi * sq_b + head * sq_n, VEC)
    do_base = DO + tl.multiple_of(bi * sdo_b + head * sdo_n, VEC)
    o_base = O + tl.multiple_of(bi * so_b + head * so_n, VEC)
    q = tl.load(q_base + tl.multiple_of(i * sq_h + j * sq_w, VEC)[:, None] + ch[None, :] * sq_d,
                mask=own, other=0.0).to(tl.float32)
    do = tl.load(do_base + tl.multiple_of(i * sdo_h + j * sdo_w, VEC)[:, None] + ch[None, :] * sdo_d,
                 mask=own, other=0.0).to(tl.float32)
    o = tl.load(o_base + tl.multiple_of(i * so_h + j * so_w, VEC)[:, None] + ch[None, :] * so_d,
                mask=own, other=0.0).to(tl.float32)
    delta = tl.sum(do * o, axis=1)  # (P,) sum_ab p_ab dp_ab
    plane = (bi * HEADS + head) * H * W
    tl.store(DELTA + plane + i * W + j, delta, mask=in_img)
    lse = tl.load(LSE + plane + i * W + j, mask=in_img, other=0.0)

    k_base = Kt + tl.multiple_of(bi * sk_b + head * sk_n, VEC)
    v_base = V + tl.multiple_of(bi * sv_b + head * sv_n, VEC)
    kidx = tl.arange(0, KP)
    dq = tl.zeros([TH * TW, BD], tl.float32)
    g_rows = tl.zeros([KP, BD], tl.float32)  # row-table gradient partial (channels < HALF used)
    s_cols = tl.zeros([TH * TW, KP], tl.float32)  # per pixel, sum over row offsets of ds, per column offset
    for a in range(KS):
        ii = i + (a - R)
        row_ok = (ii >= 0) & (ii < H)
        rrow = tl.zeros([BD], tl.float32)
        if HAS_ROWS:
            rrow = tl.load(RR + head * srr_n + a * srr_k + ch * srr_c, mask=ch < HALF, other=0.0).to(tl.float32)
        s_row = tl.zeros([TH * TW], tl.float32)  # per pixel, sum over column offsets of ds
        for b in range(KS):
            jj = j + (b - R)
            ok = row_ok & (jj >= 0) & (jj < W)
            ld = ok[:, None] & ch_ok[None, :]
            t = tl.zeros([TH * TW, BD], tl.float32)
            if HAS_K:
                t = tl.load(k_base + tl.multiple_of(ii * sk_h + jj * sk_w, VEC)[:, None] + ch[None, :] * sk_d,
                            mask=ld, other=0.0).to(tl.float32)
            if HAS_ROWS or HAS_COLS:
                rel = rrow
                if HAS_COLS:
                    rel = rrow + tl.load(RC + head * src_n + b * src_k + (ch - HALF) * src_c,
                                   mask=(ch >= HALF) & ch_ok, other=0.0).to(tl.float32)
                t = t + rel[None, :]
            s = tl.sum(q * t, axis=1) * scale
            p = tl.exp(s - lse)
            if MASK:
                p = tl.where(ok, p, 0.0)
            vv = tl.load(v_base + tl.multiple_of(ii * sv_h + jj * sv_w, VEC)[:, None] + ch[None, :] * sv_d,
                         mask=ld, other=0.0).to(tl.float32)
            ds = p * (tl.sum(do * vv, axis=1) - delta) * scale  # (P,) d loss / d raw logit
            dq += ds[:, None] * t
            if ROW_GRAD:
                s_row += ds
            if COL_GRAD:
                s_cols += tl.where(kidx[None, :] == b, ds[:, None], 0.0)
        if ROW_GRAD:
            g = tl.sum(s_row[:, None] * q, axis=0)  # (BD,)
            g_rows += tl.where(kidx[:, None] == a, g[None, :], 0.0)

    dq_base = DQ + tl.multiple_of(bi * sdq_b + head * sdq_n, VEC)
    tl.store(dq_base + tl.multiple_of(i * sdq_h + j * sdq_w, VEC)[:, None] + ch[None, :] * sdq_d, dq, mask=own)
    if ROW_GRAD or COL_GRAD:
        g_all = g_rows
        if COL_GRAD:
            g_cols = tl.zeros([KP, BD], tl.float32)
            for b in range(KS):
                col = tl.sum(tl.where(kidx[None, :] == b, s_cols, 0.0), axis=1)  # (P,)
                g = tl.sum(col[:, None] * q, axis=0)
                g_cols += tl.where(kidx[:, None] == b, g[None, :], 0.0)
            g_all = tl.where(ch[None, :] < HALF, g_rows, g_cols)
        # DREL: (HEADS, B, N_TILES, KS, D) fp32 partials, summed on the host
        prog = (head * B + bi) * N_TILES + tile
        tl.store(DREL + prog * KS * D + kidx[:, None] * D + ch[None, :], g_all,
                 mask=(kidx[:, None] < KS) & ch_ok[None, :])


@triton.jit
def _bwd_kv_kernel(
    Q, Kt, V, DO, LSE, DELTA, DK, DV, RR, RC,
    sq_b, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_h, sv_w, sv_n, sv_d,
    sdo_b, sdo_h, sdo_w, sdo_n, sdo_d,
    sdk_b, sdk_h, sdk_w, sdk_n, sdk_d,
    sdv_b, sdv_h, sdv_w, sdv_n, sdv_d,
    srr_n, srr_k, srr_c,
    src_n, src_k, src_c,
    HEADS, H, W, D, HALF, TILES_W, N_TILES, scale,
    KS: tl.constexpr, HAS_K: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_COLS: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BD: tl.constexpr, INT64: tl.constexpr, VEC: tl.constexpr,
):
    R: tl.constexpr = KS // 2
    pid = tl.program_id(0)  # heads vary fastest: the programs of one tile share its cache lines
    head = pid % HEADS
    tile = (pid // HEADS) % N_TILES
    bi = (pid // (HEADS * N_TILES)).to(tl.int64)
    offs = tl.arange(0, TH * TW)
    i = (tile // TILES_W) * TH + offs // TW  # (P,) key rows
    j = (tile % TILES_W) * TW + offs % TW  # (P,) key columns
    if INT64:
        i = i.to(tl.int64)
        j = j.to(tl.int64)
    ch = tl.arange(0, BD)
    ch_ok = ch < D
    in_img = (i < H) & (j < W)
    own = in_img[:, None] & ch_ok[None, :]

    kk = tl.zeros([TH * TW, BD], tl.float32)
    if HAS_K:
        k_base = Kt + tl.multiple_of(bi * sk_b + head * sk_n, VEC)
        kk = tl.load(k_base + tl.multiple_of(i * sk_h + j * sk_w, VEC)[:, None] + ch[None, :] * sk_d,
                     mask=own, other=0.0).to(tl.float32)
    v_base = V + tl.multiple_of(bi * sv_b + head * sv_n, VEC)
    vv = tl.load(v_base + tl.multiple_of(i * sv_h + j * sv_w, VEC)[:, None] + ch[None, :] * sv_d,
                 mask=own, other=0.0).to(tl.float32)
    q_base = Q + tl.multiple_of(bi * sq_b + head * sq_n, VEC)
    do_base = DO + tl.multiple_of(bi * sdo_b + head * sdo_n, VEC)
    plane = (bi * HEADS + head) * H * W
    dk = tl.zeros([TH * TW, BD], tl.float32)
    dv = tl.zeros([TH * TW, BD], tl.float32)
    for a in range(KS):
        qi = i - (a - R)  # the query that sees this key at row offset a
        row_ok = (qi >= 0) & (qi < H) & in_img
        rrow = tl.zeros([BD], tl.float32)
        if HAS_ROWS:
            rrow = tl.load(RR + head * srr_n + a * srr_k + ch * srr_c, mask=ch < HALF, other=0.0).to(tl.float32)
        for b in range(KS):
            qj = j - (b - R)
            ok = row_ok & (qj >= 0) & (qj < W)  # (P,) query inside the image
            ld = ok[:, None] & ch_ok[None, :]
            t = kk
            if HAS_ROWS or HAS_COLS:
                rel = rrow
                if HAS_COLS:
                    rel = rrow + tl.load(RC + head * src_n + b * src_k + (ch - HALF) * src_c,
                                   mask=(ch >= HALF) & ch_ok, other=0.0).to(tl.float32)
                t = t + rel[None, :]
            qs = tl.load(q_base + tl.multiple_of(qi * sq_h + qj * sq_w, VEC)[:, None] + ch[None, :] * sq_d,
                         mask=ld, other=0.0).to(tl.float32)
            dos = tl.load(do_base + tl.multiple_of(qi * sdo_h + qj * sdo_w, VEC)[:, None] + ch[None, :] * sdo_d,
                          mask=ld, other=0.0).to(tl.float32)
            lse = tl.load(LSE + plane + qi * W + qj, mask=ok, other=0.0)
            s = tl.sum(qs * t, axis=1) * scale
            p = tl.where(ok, tl.exp(s - lse), 0.0)
            dv += p[:, None] * dos
            if HAS_K:
                delta = tl.load(DELTA + plane + qi * W + qj, mask=ok, other=0.0)
                ds = p * (tl.sum(dos * vv, axis=1) - delta) * scale
                dk += ds[:, None] * qs

    if HAS_K:
        dk_base = DK + tl.multiple_of(bi * sdk_b + head * sdk_n, VEC)
        tl.store(dk_base + tl.multiple_of(i * sdk_h + j * sdk_w, VEC)[:, None] + ch[None, :] * sdk_d, dk, mask=own)
    dv_base = DV + tl.multiple_of(bi * sdv_b + head * sdv_n, VEC)
    tl.store(dv_base + tl.multiple_of(i * sdv_h + j * sdv_w, VEC)[:, None] + ch[None, :] * sdv_d, dv, mask=own)


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


def _table_strides(table):
    """(head, row, channel) strides; a shared (K, d/2) table gets head stride 0."""
    if table is None:
        return 0, 0, 0
    if table.dim() == 2:
        return 0, table.stride(0), table.stride(1)
    return table.stride(0), table.stride(1), table.stride(2)


def forward(q, k, v, rel_rows, rel_cols, kernel_size: int, mask: bool, scale: float):
    """Returns ``(out, lse)``: out ``(B, H, W, heads, d)`` contiguous in q's dtype, lse ``(B, heads, H, W)`` fp32."""
    B, H, W, heads, d = q.shape
    out = torch.empty((B, H, W, heads, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, heads, H, W), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    bd = _next_pow2(d)
    th, tw, num_warps = tile_config(H, W, bd, "fwd")
    tiles_w = triton.cdiv(W, tw)
    n_tiles = triton.cdiv(H, th) * tiles_w
    kt = k if k is not None else q  # dummy pointer, never read
    rr = rel_rows if rel_rows is not None else q
    rc = rel_cols if rel_cols is not None else q
    _fwd_kernel[(B * n_tiles * heads,)](
        q, kt, v, rr, rc, out, lse,
        *_strides(q), *_strides(kt), *_strides(v), *_strides(out),
        *_table_strides(rel_rows), *_table_strides(rel_cols),
        heads, H, W, d, d // 2, tiles_w, n_tiles, float(scale),
        KS=kernel_size, MASK=bool(mask), HAS_K=k is not None, HAS_ROWS=rel_rows is not None,
        HAS_COLS=rel_cols is not None, TH=th, TW=tw, BD=bd, INT64=_needs_int64(q, kt, v, out),
        VEC=_vector_width(bd, q, k, v, out), num_warps=num_warps,
    )
    return out, lse


def backward(dout, q, k, v, out, lse, rel_rows, rel_cols, kernel_size: int, mask: bool, scale: float,
             need_kv: bool = True, need_rows: bool = True, need_cols: bool = True):
    """Returns ``(dq, dk, dv, drows, dcols)``; dk is None without k, d-tables None when absent or not needed."""
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
    rr = rel_rows if rel_rows is not None else q
    rc = rel_cols if rel_cols is not None else q
    vec = _vector_width(bd, q, k, v, out, dq)
    if _vector_width(bd, dout) < vec:  # e.g. a permuted upstream gradient: one copy beats scalar loads everywhere
        dout = dout.contiguous()
    int64 = _needs_int64(q, kt, v, out, dout)
    delta = torch.empty((B, heads, H, W), dtype=torch.float32, device=q.device)

    th, tw, num_warps = tile_config(H, W, bd, "bwd_q")
    tiles_w = triton.cdiv(W, tw)
    n_tiles = triton.cdiv(H, th) * tiles_w
    drel = torch.empty((heads, B, n_tiles, kernel_size, d) if (row_grad or col_grad) else (1,),
                       dtype=torch.float32, device=q.device)
    _bwd_q_kernel[(B * n_tiles * heads,)](
        q, kt, v, out, dout, lse, delta, dq, drel, rr, rc,
        *_strides(q), *_strides(kt), *_strides(v), *_strides(out), *_strides(dout), *_strides(dq),
        *_table_strides(rel_rows), *_table_strides(rel_cols),
        B, heads, H, W, d, d // 2, tiles_w, n_tiles, float(scale),
        KS=kernel_size, KP=_next_pow2(kernel_size), MASK=bool(mask), HAS_K=k is not None,
        HAS_ROWS=rel_rows is not None, HAS_COLS=rel_cols is not None, ROW_GRAD=row_grad, COL_GRAD=col_grad,
        TH=th, TW=tw, BD=bd, INT64=int64, VEC=vec, num_warps=num_warps,
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
        th, tw, num_warps = tile_config(H, W, bd, "bwd_kv")
        tiles_w = triton.cdiv(W, tw)
        n_tiles = triton.cdiv(H, th) * tiles_w
        dkt = dk if dk is not None else dv
        _bwd_kv_kernel[(B * n_tiles * heads,)](
            q, kt, v, dout, lse, delta, dkt, dv, rr, rc,
            *_strides(q), *_strides(kt), *_strides(v), *_strides(dout), *_strides(dkt), *_strides(dv),
            *_table_strides(rel_rows), *_table_strides(rel_cols),
            heads, H, W, d, d // 2, tiles_w, n_tiles, float(scale),
            KS=kernel_size, HAS_K=k is not None, HAS_ROWS=rel_rows is not None, HAS_COLS=rel_cols is not None,
            TH=th, TW=tw, BD=bd, INT64=int64, VEC=vec, num_warps=num_warps,
        )
    return dq, dk, dv, drows, dcols
