"""The ``shifted`` backend: k*k shifted slices of one padded, flattened buffer, with a hand-written backward.

Nothing is unfolded. Each (batch, head) plane is kept channels-first, zero-padded by r = k//2 and flattened with
the row pitch ``P = W + r`` (one r-wide zero gap between rows serves as the right padding of a row and the left
padding of the next): the key of query pixel ``n = i * P + j`` at window offset ``(a, b)`` then sits at flat index
``n + a * P + b`` of the padded K/V buffer, so every window offset is one *contiguous* slice (queries use the same
pitch; the r extra columns per row are computed and dropped, and because q and dout are zero there they add
nothing to any gradient). Per pass:

- logits ``sum_d q * k_window``: one ``addcmul_`` per channel d over all k*k offsets at once (a strided view
  of the padded K whose (a, b, n) strides are (P, 1, 1));
- ``out = sum_o p_o * v_o`` and the backward's gathers / scatters: one ``addcmul_`` per offset.

Autograd saves q, k, v (views) and the probabilities ``(B, heads, k*k, H*P)``; the backward recomputes the rest
(no k*k copies of K and V as with unfold). A 1x1 NCHW convolution's output viewed as ``(B, H, W, heads, head_dim)``
is already channels-first, so the permutes below are free for the layer.

A core is the (forward, backward) pair on the flat padded buffers: ``"eager"`` (below) or one registered with
``register_core`` (``inductor.py``); both run behind the same custom ops. Any device and dtype; layout and maths
in ``sasa/functional.py``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Optional  # custom_op schema inference on torch 2.5 wants typing.Optional, not "X | None"

import torch
import torch.nn.functional as F
from torch import Tensor

from . import Backend, register


def _cf(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 4, 1, 2)  # (B, H, W, h, d) <-> (B, h, d, H, W), a view (the permutation is its own inverse)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 / bf16 inputs are computed in fp32: 49-term sums and the softmax lose too much in half precision."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def geometry(H: int, W: int, K: int) -> tuple[int, int, int]:
    """(r, P, rows): window radius, row pitch and rows of the padded K/V buffer (r zero rows on top, r plus enough
    spare rows below that the last query's last window offset is in range)."""
    r = K // 2
    P = W + r
    return r, P, H + 2 * r + -(-2 * r // P)


def padded_queries(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, H, W, h, d) -> (B, h, d, H * P): channels-first, right-padded to the row pitch."""
    B, H, W, h, d = x.shape
    return F.pad(_cf(x).to(_compute_dtype(x.dtype)), (0, r)).view(B, h, d, H * (W + r))


def padded_keys(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, H, W, h, d) -> (B, h, d, rows * P): r zero columns left of every row, r zero rows above, spare rows below."""
    B, H, W, h, d = x.shape
    rows = geometry(H, W, 2 * r + 1)[2]
    return F.pad(_cf(x).to(_compute_dtype(x.dtype)), (r, 0, r, rows - H - r)).view(B, h, d, -1)


def _window(xp: torch.Tensor, channel: int, K: int, P: int, N: int) -> torch.Tensor:
    """View ``(B, h, K, K, N)`` of one channel of padded ``xp``: ``[..., a, b, n] = xp[..., channel, n + a*P + b]``."""
    s = xp.stride()
    return xp.as_strided((xp.shape[0], xp.shape[1], K, K, N), (s[0], s[1], P, 1, 1),
                         xp.storage_offset() + channel * s[2])


def _dots(x: torch.Tensor, yp: torch.Tensor, K: int, P: int, acc: torch.Tensor | None = None) -> torch.Tensor:
    """(B, h, K*K, N): sum over d of x (B, h, d, N) times yp's (B, h, d, L) windows, added in place to ``acc``."""
    B, h, d, N = x.shape
    for c in range(d):
        term = (x[:, :, c, None, None, :], _window(yp, c, K, P, N))
        if acc is None:
            acc = x.new_empty(B, h, K * K, N)
            torch.mul(*term, out=acc.view(B, h, K, K, N))
        else:
            acc.view(B, h, K, K, N).addcmul_(*term)
    return acc


def window_starts(K: int, P: int) -> list[int]:
    """Flat start of each window offset ``(a, b)`` (row-major, the probabilities' order) in a padded buffer."""
    return [a * P + b for a in range(K) for b in range(K)]


def _gather(w: torch.Tensor, xp: torch.Tensor, starts: list[int], out: torch.Tensor) -> torch.Tensor:
    """out (B, h, d, N) = sum_o w[:, :, o] * xp[..., s_o : s_o + N]."""
    N = out.shape[-1]
    # one unbind for the weight rows and narrow for the slices: less Python per offset
    for o, (s, w_o) in enumerate(zip(starts, w.unsqueeze(3).unbind(2))):
        if o == 0:
            torch.mul(w_o, xp.narrow(-1, s, N), out=out)
        else:
            out.addcmul_(w_o, xp.narrow(-1, s, N))
    return out


def scatter(w: torch.Tensor, x: torch.Tensor, starts: list[int], L: int) -> torch.Tensor:
    """The adjoint of ``_gather``: (B, h, d, L) buffer with ``[..., s_o : s_o + N] += w[:, :, o] * x`` for every o."""
    B, h, d, N = x.shape
    acc = x.new_zeros(B, h, d, L)
    for s, w_o in zip(starts, w.unsqueeze(3).unbind(2)):
        acc.narrow(-1, s, N).addcmul_(w_o, x)
    return acc


def _crop(buf: torch.Tensor, H: int, W: int, P: int, row0: int, col0: int, like: torch.Tensor, *,
          as_base: bool = False) -> torch.Tensor:
    """Flat padded ``(B, h, d, rows * P)`` -> its ``(B, H, W, h, d)`` image from (row0, col0), copied in ``like``'s
    dtype and memory order: channels-last if ``like`` has a unit channel stride, else channels-first (NCHW for the
    layer). ``as_base``: a channels-first result is returned as its own ``(B, h, d, H, W)`` tensor, not a view."""
    B, h, d, _ = buf.shape
    img = buf.view(B, h, d, -1, P)[..., row0 : row0 + H, col0 : col0 + W]  # (B, h, d, H, W) view
    if like.stride(-1) == 1:
        return buf.new_empty((B, H, W, h, d), dtype=like.dtype).copy_(_cf(img))
    base = buf.new_empty((B, h, d, H, W), dtype=like.dtype).copy_(img)
    return base if as_base else _cf(base)


@functools.lru_cache(maxsize=64)
def outside_mask(H: int, W: int, K: int, device: torch.device) -> torch.Tensor:
    """(K*K, H*P) bool: True where the window position falls outside the image (never for the padding columns)."""
    r, P, rows = geometry(H, W, K)
    inside = F.pad(torch.ones(H, W, device=device), (r, 0, r, rows - H - r)).flatten()
    mask = inside.as_strided((K, K, H, P), (P, 1, P, 1)) == 0  # [a, b, i, j] = inside[(i + a) * P + j + b]
    mask[..., W:] = False  # padding queries: keep them finite
    return mask.reshape(K * K, H * P)


def eager_forward(q, k, v, rel_rows, rel_cols, K: int, mask: bool, scale: float):
    """The eager core: ``(out (B, h, d, N) flat, probs (B, h, K*K, N))``; padded buffers are dropped after use."""
    B, H, W, h, d = q.shape
    c = d // 2
    r, P, _ = geometry(H, W, K)
    N = H * P
    qf = padded_queries(q, r)  # (B, h, d, N), a fresh buffer
    if scale != 1.0:
        qf *= scale  # scale * (q.k + q.r) = (scale q).k + (scale q).r
    logits = None  # (B, h, K*K, N), [..., a*K + b, :] = offset (a - r, b - r)
    if rel_rows is not None or rel_cols is not None:
        zero = qf.new_zeros(())
        rows = torch.matmul(rel_rows.to(qf.dtype), qf[:, :, :c]) if rel_rows is not None else zero  # (B,h,K,N)
        cols = torch.matmul(rel_cols.to(qf.dtype), qf[:, :, c:]) if rel_cols is not None else zero
        logits = torch.add(rows[:, :, :, None] if rows.dim() else rows, cols[:, :, None, :] if cols.dim() else cols)
        logits = logits.expand(B, h, K, K, N).reshape(B, h, K * K, N)
    if k is not None:
        logits = _dots(qf, padded_keys(k, r), K, P, logits)
    if logits is None:
        logits = qf.new_zeros(B, h, K * K, N)
    del qf
    if mask:
        logits.masked_fill_(outside_mask(H, W, K, q.device), float("-inf"))
    probs = torch.softmax(logits, dim=2)  # (B, h, K*K, N)
    del logits
    starts = window_starts(K, P)
    return _gather(probs, padded_keys(v, r), starts, probs.new_empty(B, h, d, N)), probs


def eager_backward(dout, q, k, v, probs, rel_rows, rel_cols, K: int, scale: float, needs: tuple[bool, ...]):
    """The eager core: ``(dq (B, h, d, N), dk, dv (B, h, d, L), drows, dcols)``, flat padded buffers, None where
    absent or not needed; ``dout`` is (B, H, W, h, d)."""
    B, H, W, h, d = q.shape
    c = d // 2
    r, P, rows = geometry(H, W, K)
    N, L = H * P, rows * P
    starts = window_starts(K, P)
    need_q, need_k, need_v, need_rows, need_cols = needs
    dof = padded_queries(dout, r)  # (B, h, d, N), zero in the padding columns
    ds = _dots(dof, padded_keys(v, r), K, P)  # dL/dprobs
    ds = torch._softmax_backward_data(ds, probs, 2, probs.dtype)  # dL/dlogits
    if scale != 1.0:
        ds *= scale
    qf = padded_queries(q, r)
    dq = dk = dv = drows = dcols = None
    if need_q:
        dq = _gather(ds, padded_keys(k, r), starts, torch.empty_like(qf)) if k is not None else torch.zeros_like(qf)
    if k is not None and need_k:
        dk = scatter(ds, qf, starts, L)
    if need_v:
        dv = scatter(probs, dof, starts, L)
    ds5 = ds.view(B, h, K, K, N)
    for table, dim, lo, need in ((rel_rows, 3, 0, need_rows), (rel_cols, 2, c, need_cols)):
        if table is None:
            continue
        g = ds5.sum(dim)  # (B, h, K, N): gradient of the row (column) offset logits
        if need_q:
            dq[:, :, lo : lo + c] += torch.matmul(table.to(qf.dtype).transpose(-1, -2), g)
        if need:
            dt = torch.matmul(g, qf[:, :, lo : lo + c].transpose(-1, -2))  # (B, h, K, c)
            dt = dt.sum(0) if table.dim() == 3 else dt.sum((0, 1))
            if lo == 0:
                drows = dt
            else:
                dcols = dt
    return dq, dk, dv, drows, dcols


def _forward(q, k, v, rel_rows, rel_cols, K: int, mask: bool, scale: float,
             core: str = "eager") -> tuple[torch.Tensor, torch.Tensor]:
    """(out, probs): out as ``_crop(..., as_base=True)`` lays it out, probs ``(B, h, K*K, H*P)`` for the backward;
    ``_CORES[core]`` computes them on the flat padded buffers."""
    B, H, W, h, d = q.shape
    out, probs = _CORES[core][0](q, k, v, rel_rows, rel_cols, K, mask, scale)
    # a fresh tensor, never a view (custom-op outputs must own their storage; an in-place ReLU on the layer's
    # output then works too); ``shifted_attention`` permutes it outside
    return _crop(out, H, W, geometry(H, W, K)[1], 0, 0, q, as_base=True), probs


def _backward(dout, q, k, v, rel_rows, rel_cols, probs, K: int, scale: float, needs: tuple[bool, ...],
              core: str = "eager"):
    """(dq, dk, dv, drows, dcols), None where absent or not needed (``needs``: q, k, v, rows, cols)."""
    if q.stride(-1) != 1:
        dout = _cf(dout)  # the forward returned (B, h, d, H, W): back to (B, H, W, h, d)
    B, H, W, h, d = q.shape
    r, P, _ = geometry(H, W, K)
    dq, dk, dv, drows, dcols = _CORES[core][1](dout, q, k, v, probs, rel_rows, rel_cols, K, scale, needs)
    dq, dk, dv = (_crop(g, H, W, P, o, o, q) if g is not None else None for g, o in ((dq, 0), (dk, r), (dv, r)))
    drows, dcols = (g.to(t.dtype) if g is not None else None for g, t in ((drows, rel_rows), (dcols, rel_cols)))
    return dq, dk, dv, drows, dcols


_CORES = {"eager": (eager_forward, eager_backward)}  # name -> (forward core, backward core)


def register_core(name: str, forward: Callable, backward: Callable) -> None:
    """``shifted_attention(..., core=name)`` runs these in place of ``eager_forward`` / ``eager_backward``."""
    _CORES[name] = (forward, backward)


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)  # dtypes are chosen here (fp32 inside for fp16 / bf16)


def _grad_like(q: torch.Tensor) -> torch.Tensor:
    """An empty tensor in the layout ``_crop`` gives q's gradient (and the output)."""
    B, H, W, h, d = q.shape
    if q.stride(-1) == 1:
        return q.new_empty((B, H, W, h, d))
    return _cf(q.new_empty((B, h, d, H, W)))


# Custom ops, as for the Triton backend: torch.compile keeps each call as one opaque node (no graph break; the
# strided views of padded buffers and in-place accumulation inside are eager code).
@torch.library.custom_op("sasa::shifted_fwd", mutates_args=())
def shifted_fwd(q: Tensor, k: Optional[Tensor], v: Tensor, rel_rows: Optional[Tensor],  # noqa: UP045
                rel_cols: Optional[Tensor], kernel_size: int, mask: bool,  # noqa: UP045
                scale: float, core: str) -> tuple[Tensor, Tensor]:
    """``(out, probs)``: out ``(B, h, d, H, W)`` for channels-first q, else ``(B, H, W, h, d)``; probs fp32 or q's.
    ``core``: a name given to ``register_core`` or ``"eager"``."""
    with _no_autocast(q.device):
        return _forward(q, k, v, rel_rows, rel_cols, kernel_size, mask, scale, core)


@shifted_fwd.register_fake
def _(q, k, v, rel_rows, rel_cols, kernel_size, mask, scale, core):
    B, H, W, h, d = q.shape
    out = _grad_like(q)
    out = out if q.stride(-1) == 1 else _cf(out).contiguous()
    r, P, _ = geometry(H, W, kernel_size)
    return out, q.new_empty((B, h, kernel_size * kernel_size, H * P), dtype=_compute_dtype(q.dtype))


@torch.library.custom_op("sasa::shifted_bwd", mutates_args=())
def shifted_bwd(dout: Tensor, q: Tensor, k: Optional[Tensor], v: Tensor, rel_rows: Optional[Tensor],  # noqa: UP045
                rel_cols: Optional[Tensor], probs: Tensor, kernel_size: int, scale: float,  # noqa: UP045
                needs: list[bool], core: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, drows, dcols)``; a gradient that is absent or not needed is an empty tensor."""
    with _no_autocast(q.device):
        grads = _backward(dout, q, k, v, rel_rows, rel_cols, probs, kernel_size, scale, tuple(needs), core)
    return tuple(g if g is not None else q.new_empty(0) for g in grads)


@shifted_bwd.register_fake
def _(dout, q, k, v, rel_rows, rel_cols, probs, kernel_size, scale, needs, core):
    need_q, need_k, need_v, need_rows, need_cols = needs
    dq = _grad_like(q) if need_q else q.new_empty(0)
    dk = _grad_like(q) if (k is not None and need_k) else q.new_empty(0)
    dv = _grad_like(q) if need_v else q.new_empty(0)
    drows = rel_rows.new_empty(rel_rows.shape) if (rel_rows is not None and need_rows) else q.new_empty(0)
    dcols = rel_cols.new_empty(rel_cols.shape) if (rel_cols is not None and need_cols) else q.new_empty(0)
    return dq, dk, dv, drows, dcols


def _setup_context(ctx, inputs, output):
    q, k, v, rel_rows, rel_cols, kernel_size, _mask, scale, core = inputs
    ctx.save_for_backward(q, k, v, rel_rows, rel_cols, output[1])
    ctx.kernel_size, ctx.scale, ctx.core = kernel_size, scale, core
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else autograd zero-fills a gradient for the probabilities (k*k x the output)


def _autograd_backward(ctx, dout, _dprobs):
    if dout is None:  # the output took no part in the loss
        return (None,) * 9
    q, k, v, rel_rows, rel_cols, probs = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    needs[1] = needs[1] and k is not None
    needs[3] = needs[3] and rel_rows is not None
    needs[4] = needs[4] and rel_cols is not None
    grads = shifted_bwd(dout, q, k, v, rel_rows, rel_cols, probs, ctx.kernel_size, ctx.scale, needs, ctx.core)
    return tuple(g if n else None for g, n in zip(grads, needs)) + (None,) * 4


torch.library.register_autograd("sasa::shifted_fwd", _autograd_backward, setup_context=_setup_context)


def shifted_attention(q, k, v, rel_rows, rel_cols, kernel_size, padding, scale, core: str = "eager"):
    out, _probs = shifted_fwd(q, k, v, rel_rows, rel_cols, int(kernel_size), padding == "mask", float(scale), core)
    return out if q.stride(-1) == 1 else _cf(out)  # channels-first results come back as (B, h, d, H, W)


def _can_run(q, **_) -> str | None:
    return None


register(Backend(name="shifted", op="window", apply=shifted_attention, can_run=_can_run,
                 priority={"cpu": 10, "cuda": 5}))
