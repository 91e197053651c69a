"""The functional ops ``local_attention_2d`` and ``stem_attention``: argument checks, layout, backend choice, dispatch.

Layout (stated once, used everywhere): ``q``, ``k``, ``v`` and the output are channels-last
``(batch, height, width, heads, head_dim)`` tensors; strided views (e.g. slices of one fused QKV projection) are
accepted. ``rel_rows`` / ``rel_cols`` are ``(kernel_size, head_dim // 2)`` tables shared by all heads, or
``(heads, kernel_size, head_dim // 2)`` per-head tables; either may be ``None`` (no row / column term).

For every pixel (i, j) and head, with r = kernel_size // 2 and offsets (a, b) in [-r, r]^2::

    logit[a, b] = scale * (q_ij . k_{i+a, j+b} + q_ij[:d/2] . rel_rows[a + r] + q_ij[d/2:] . rel_cols[b + r])
    out_ij      = sum_{a,b} softmax(logit)[a, b] * v_{i+a, j+b}

Borders (SPEC section 1, a decision the paper leaves open): ``padding="zeros"`` treats positions outside the
image as k = v = 0 that still take part in the softmax with logit ``scale * q . r``; ``padding="mask"`` drops them
from the softmax. Windows larger than the map are legal in both modes. ``k=None`` gives q.r-only logits (the
paper's ablation without W_K).

With ``padding="mask"`` an offset as large as the map is masked for every query, so the op runs the window
clipped to ``2 * max(H, W) - 1`` with the middle rows of the tables (exact: same output, and zero gradient for the
table rows left out, as the full window).

Both ops choose their backend in ``sasa.backends`` (one registry and vocabulary: ``reference`` the oracle,
``shifted`` eager PyTorch, ``inductor`` compiled on CPU, ``triton`` on CUDA; its docstring has the table), and only
through it: nothing outside ``sasa/backends`` imports a backend module. ``attention_probs`` gives the window op's
softmax weights (for attention maps).
"""

from __future__ import annotations

import torch

from . import backends as _backends

PADDING_MODES = ("zeros", "mask")

# the op in standard operators (scripting and export); arguments channels-first, already checked
window_attention_portable = _backends.window_attention_portable


def available_backends(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
                       op: str = "window") -> list[str]:
    """Names of ``op``'s backends (``"window"``: ``local_attention_2d``, ``"stem"``: ``stem_attention``) that can
    run on ``device`` with ``dtype``, fastest first."""
    device = torch.device(device)
    probe = torch.empty(1, 1, 1, 1, 2, device="meta", dtype=dtype)
    return [b.name for b in _backends.ranked(op, device) if b.can_run(probe, device=device) is None]


def _check_table(name: str, table: torch.Tensor | None, heads: int, kernel_size: int, half: int, q: torch.Tensor):
    if table is None:
        return
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(table).__name__}")
    ok = (table.dim() == 2 and tuple(table.shape) == (kernel_size, half)) or (
        table.dim() == 3 and tuple(table.shape) == (heads, kernel_size, half)
    )
    if not ok:
        raise ValueError(
            f"{name} must have shape (kernel_size, head_dim // 2) = {(kernel_size, half)} or "
            f"(heads, kernel_size, head_dim // 2) = {(heads, kernel_size, half)}, got {tuple(table.shape)}"
        )
    if table.device != q.device:
        raise ValueError(f"{name} is on {table.device} but q is on {q.device}")


def check_kernel_size(kernel_size) -> int:
    """Validate an odd positive kernel size and return it as an int."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise TypeError(f"kernel_size must be an int, got {type(kernel_size).__name__} ({kernel_size!r})")
    if kernel_size <= 0 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive (3, 5, 7, ...), got {kernel_size}")
    return kernel_size


def _clip_to_map(kernel_size: int, rel_rows, rel_cols, height: int, width: int):
    """``padding="mask"``: the window and tables cut to the offsets that can land on the map (module docstring)."""
    fit = 2 * max(height, width) - 1
    if fit >= kernel_size:
        return kernel_size, rel_rows, rel_cols
    cut = (kernel_size - fit) // 2
    return fit, *(t.narrow(-2, cut, fit).contiguous() if t is not None else None for t in (rel_rows, rel_cols))


def _check(q, k, v, rel_rows, rel_cols, kernel_size, padding) -> int:
    """``local_attention_2d``'s argument checks; returns the kernel size."""
    for name, t in (("q", q), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 5:
            raise ValueError(f"{name} must have shape (B, H, W, heads, head_dim) (rank 5), got rank {t.dim()}")
    if k is not None:
        if not isinstance(k, torch.Tensor):
            raise TypeError(f"k must be a torch.Tensor or None, got {type(k).__name__}")
        if k.shape != q.shape:
            raise ValueError(f"k must have the same shape as q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != q.shape:
        raise ValueError(f"v must have the same shape as q {tuple(q.shape)}, got {tuple(v.shape)}")
    tensors = [t for t in (q, k, v) if t is not None]
    if len({t.device for t in tensors}) != 1 or len({t.dtype for t in tensors}) != 1:
        raise ValueError("q, k and v must share one device and dtype, got " + ", ".join(
            f"{t.device}/{t.dtype}" for t in tensors))
    if not q.is_floating_point():
        raise TypeError(f"q, k, v must be floating point, got {q.dtype}")
    kernel_size = check_kernel_size(kernel_size)
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
    heads, head_dim = q.shape[3], q.shape[4]
    if (rel_rows is not None or rel_cols is not None) and head_dim % 2:
        raise ValueError(f"relative tables split head_dim in two halves, so head_dim must be even, got {head_dim}")
    _check_table("rel_rows", rel_rows, heads, kernel_size, head_dim // 2, q)
    _check_table("rel_cols", rel_cols, heads, kernel_size, head_dim // 2, q)
    return kernel_size


def local_attention_2d(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor,
    rel_rows: torch.Tensor | None = None,
    rel_cols: torch.Tensor | None = None,
    *,
    kernel_size: int,
    padding: str = "zeros",
    scale: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Local k x k self-attention over a 2D map (SASA, SPEC section 1).

    Args:
        q: queries, ``(B, H, W, heads, head_dim)``.
        k: keys, same shape as ``q``, or ``None`` for q.r-only logits.
        v: values, same shape as ``q``.
        rel_rows: row-offset embeddings, ``(kernel_size, head_dim // 2)`` or ``(heads, kernel_size, head_dim // 2)``.
        rel_cols: column-offset embeddings, same shapes as ``rel_rows``.
        kernel_size: odd window size.
        padding: ``"zeros"`` or ``"mask"``, see the module docstring.
        scale: multiplies the logits (the paper's equations have no 1/sqrt(d)).
        backend: a name from ``available_backends(device)``; ``None`` picks the fastest that can run
            (``SASA_BACKEND`` overrides the automatic choice); inside ``sasa.backends.force(name)`` every call runs
            ``name``.

    Returns:
        ``(B, H, W, heads, head_dim)``.
    """
    kernel_size = _check(q, k, v, rel_rows, rel_cols, kernel_size, padding)
    scale = float(scale)
    if padding == "mask":
        kernel_size, rel_rows, rel_cols = _clip_to_map(kernel_size, rel_rows, rel_cols, q.shape[1], q.shape[2])

    chosen = _backends.choose("window", q, backend, k=k, rel_rows=rel_rows, rel_cols=rel_cols,
                              kernel_size=kernel_size, padding=padding)
    return chosen.apply(q, k, v, rel_rows, rel_cols, kernel_size, padding, scale)


def attention_probs(q: torch.Tensor, k: torch.Tensor | None, rel_rows: torch.Tensor | None = None,
                    rel_cols: torch.Tensor | None = None, *, kernel_size: int, padding: str = "zeros",
                    scale: float = 1.0) -> torch.Tensor:
    """The softmax weights of ``local_attention_2d`` (same arguments, no ``v``): ``(B, H, W, heads, k, k)``, entry
    ``[..., a, b]`` for the neighbour at offset ``(a - k//2, b - k//2)``. Computed by ``reference`` (the fast
    backends never materialise them)."""
    kernel_size = _check(q, k, q, rel_rows, rel_cols, kernel_size, padding)
    return _backends.attention_probs(q, k, rel_rows, rel_cols, kernel_size, padding, float(scale))


def stem_attention(x: torch.Tensor, g: torch.Tensor, pm: torch.Tensor | None, wv: torch.Tensor, *, block: int,
                   backend: str | None = None) -> torch.Tensor:
    """The attention stem's block attention in its reassociated form (``sasa/backends/stem.py`` has the maths).

    Args:
        x: the image, ``(B, C, H, W)``; H and W multiples of ``block``.
        g: ``(C, heads * C)``, column block h = ``scale * W_Q,h^T W_K,h``.
        pm: ``(block * block, M)`` mixture weights p(b, m) of spatially-aware values (row-major block positions),
            or None for plain values.
        wv: ``(heads, J, d)`` value projections, J = M * C (C for plain values).
        block: side of the non-overlapping attention blocks.
        backend: a name from ``available_backends(device, op="stem")``; ``None`` picks as for ``local_attention_2d``
            (``SASA_STEM_BACKEND`` overrides the automatic choice).

    Returns: ``(B, heads * d, H, W)``, contiguous.
    """
    B, C, H, W = x.shape
    heads, J, d = wv.shape
    M = pm.shape[1] if pm is not None else 1
    if H % block or W % block or tuple(g.shape) != (C, heads * C) or J != M * C:
        raise ValueError(f"stem_attention: expected H, W multiples of block={block}, g (C, heads * C) = "
                         f"{(C, heads * C)} and wv (heads, M * C, d) with M = {M}; got x {tuple(x.shape)}, "
                         f"g {tuple(g.shape)}, wv {tuple(wv.shape)}")
    chosen = _backends.choose("stem", x, backend, block=block, mixtures=M)
    return chosen.apply(x, g, pm, wv, block=block)
