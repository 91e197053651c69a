"""The ``triton`` backend of both ops: fused Triton kernels (the training path on CUDA).

The ``window`` op (``local_attention_2d``):

The forward is one kernel (online softmax over the k*k offsets, nothing materialised); it saves only the output
and a per-(pixel, head) fp32 log-sum-exp. The backward is two kernels, query-centric (dq and the relative-table
gradients) and key-centric (dk, dv), with no atomics, so gradients are deterministic by construction: this is the
only mode (there is nothing to switch). q, k, v may be strided views, e.g. slices of one fused QKV projection;
strides go to the kernels, nothing is copied. Any dtype of fp32 / bf16 / fp16, fp32 arithmetic inside.
Kernels and launch logic: ``triton_kernels.py``. Layout and maths: ``sasa/functional.py``.

The op is registered as the torch.library custom ops ``sasa::local_attention_fwd`` / ``sasa::local_attention_bwd``
with fake (meta) implementations and autograd, so ``torch.compile`` traces through it without a graph break.

CPU tensors run the same kernels in Triton's interpreter when ``TRITON_INTERPRET=1`` is set (for tests only: it
is very slow). The kernel module is loaded lazily on first use, compiled or interpreted by the tensors' device, so
importing ``sasa`` never decorates a kernel. Triton itself must be first imported with ``TRITON_INTERPRET=1`` for
the interpreter to work (its ``tl.sum`` helpers are decorated at import, and torchvision imports triton):
``tests/conftest.py`` sets the variable before anything is imported.

The ``stem`` op (``stem_attention``, maths in ``stem.py``) is two kernels (``triton_stem_kernels.py``): one program
per 8 blocks reads the image where it lies and writes the NCHW output; the backward recomputes per block and
reduces the parameter gradients per program (deterministic). Under ``torch.compile`` it declines (the compiler fuses
the PyTorch form).

Self-check (``selfcheck.py``): the first call of a kernel configuration in a process (window op: device, dtypes,
head_dim, kernel size, padding, which of k and the tables are present, ``triton_kernels.launch_config``'s tiles,
heads per program, vector and index width; stem: device, dtypes, channels, heads, mixtures, head_dim, block, memory
format) first runs the same kernels on a small input of that configuration against ``reference``, forward and every
gradient; a configuration that fails warns once and runs ``shifted`` (``SASA_KERNEL_CHECK``). The window op checks
and falls back inside its custom ops, so compiled graphs are covered at their first run; the stem, which runs only
outside torch.compile, in ``stem_triton``.

Tested against ``reference`` in the interpreter and on a GPU (``pytest -m gpu``, ``tests/test_gpu.py``)."""

import contextlib
import importlib.util
import os
import sys
from typing import Optional  # custom_op schema inference on torch 2.5 wants typing.Optional, not "X | None"

import torch
from torch import Tensor

from .. import settings
from . import Backend, get, register, selfcheck

MAX_HEAD_DIM = 128
MAX_KERNEL_SIZE = 11
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_KERNELS: dict = {}


def _kernels(interpret: bool, module: str = "triton_kernels"):
    """A kernel module of this package (``triton_kernels``, ``triton_stem_kernels``), loaded once per mode
    (compiled / interpreted) with ``TRITON_INTERPRET`` set to match."""
    mod = _KERNELS.get((module, interpret))
    if mod is not None:
        return mod
    name = f"{__package__}.{module}" + ("_interpreted" if interpret else "")
    path = os.path.join(os.path.dirname(__file__), module + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"  # triton.jit reads it when decorating
    try:
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    _KERNELS[(module, interpret)] = mod
    return mod


def kernels_for(device: torch.device, module: str = "triton_kernels"):
    """Interpreted kernels for CPU tensors (or when ``TRITON_INTERPRET=1``), compiled ones otherwise."""
    return _kernels(device.type != "cuda" or settings.triton_interpret(), module)


def _on_device(q: Tensor):
    """Triton launches on the *current* CUDA device: make it q's (cuda:1 tensors in a cuda:0 context)."""
    return torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()


def _empty(q: Tensor) -> Tensor:
    return q.new_empty(0)


@torch.library.custom_op("sasa::local_attention_fwd", mutates_args=())
def local_attention_fwd(q: Tensor, k: Optional[Tensor], v: Tensor, rel_rows: Optional[Tensor],  # noqa: UP045
                        rel_cols: Optional[Tensor], kernel_size: int, mask: bool,  # noqa: UP045
                        scale: float) -> tuple[Tensor, Tensor]:
    """Forward: ``(out (B, H, W, heads, d) contiguous, lse (B, heads, H, W) fp32)``."""
    with _on_device(q):
        kernels = kernels_for(q.device)
        config = kernels.launch_config(q, k, v)
        if not _window_verified(kernels, q, k, v, rel_rows, rel_cols, kernel_size, mask, config):
            return _shifted_forward(q, k, v, rel_rows, rel_cols, kernel_size, mask, scale)
        return kernels.forward(q, k, v, rel_rows, rel_cols, kernel_size, mask, scale, config=config)


@local_attention_fwd.register_fake
def _(q, k, v, rel_rows, rel_cols, kernel_size, mask, scale):
    B, H, W, heads, _d = q.shape
    return q.new_empty(q.shape), q.new_empty((B, heads, H, W), dtype=torch.float32)


@torch.library.custom_op("sasa::local_attention_bwd", mutates_args=())
def local_attention_bwd(dout: Tensor, q: Tensor, k: Optional[Tensor], v: Tensor, out: Tensor, lse: Tensor,  # noqa: UP045
                        rel_rows: Optional[Tensor], rel_cols: Optional[Tensor], kernel_size: int, mask: bool,  # noqa: UP045
                        scale: float, need_kv: bool, need_rows: bool, need_cols: bool
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward: ``(dq, dk, dv, drows, dcols)``; a gradient that is absent or not needed is an empty tensor."""
    with _on_device(q):
        kernels = kernels_for(q.device)
        config = kernels.launch_config(q, k, v)  # the forward's: the same verdict
        if not _window_verified(kernels, q, k, v, rel_rows, rel_cols, kernel_size, mask, config):
            return _shifted_backward(dout, q, k, v, rel_rows, rel_cols, kernel_size, mask, scale, need_kv, need_rows,
                                     need_cols)
        grads = kernels.backward(dout, q, k, v, out, lse, rel_rows, rel_cols, kernel_size, mask, scale,
                                 need_kv=need_kv, need_rows=need_rows, need_cols=need_cols, config=config)
    return tuple(g if g is not None else _empty(q) for g in grads)


@local_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, rel_rows, rel_cols, kernel_size, mask, scale, need_kv, need_rows, need_cols):
    dq = q.new_empty(q.shape)
    dk = q.new_empty(q.shape) if (k is not None and need_kv) else _empty(q)
    dv = q.new_empty(q.shape) if need_kv else _empty(q)
    drows = rel_rows.new_empty(rel_rows.shape) if (rel_rows is not None and need_rows) else _empty(q)
    dcols = rel_cols.new_empty(rel_cols.shape) if (rel_cols is not None and need_cols) else _empty(q)
    return dq, dk, dv, drows, dcols


def _setup_context(ctx, inputs, output):
    q, k, v, rel_rows, rel_cols, kernel_size, mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rel_rows, rel_cols, out, lse)
    ctx.kernel_size, ctx.mask, ctx.scale = kernel_size, mask, scale
    ctx.present = (k is not None, rel_rows is not None, rel_cols is not None)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse


def _backward(ctx, dout, _dlse):
    if dout is None:  # the output took no part in the loss
        return (None,) * 8
    q, k, v, rel_rows, rel_cols, out, lse = ctx.saved_tensors
    has_k, has_rows, has_cols = ctx.present
    need_q, need_k, need_v, need_rows, need_cols = ctx.needs_input_grad[:5]
    dq, dk, dv, drows, dcols = local_attention_bwd(
        dout, q, k, v, out, lse, rel_rows, rel_cols, ctx.kernel_size, ctx.mask, ctx.scale,
        bool(need_k or need_v), bool(need_rows), bool(need_cols))
    return (dq if need_q else None, dk if (has_k and need_k) else None, dv if need_v else None,
            drows if (has_rows and need_rows) else None, dcols if (has_cols and need_cols) else None,
            None, None, None)


torch.library.register_autograd("sasa::local_attention_fwd", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------ the window op's self-check


def _table(t: Tensor | None) -> tuple | None:
    return None if t is None else (t.dtype, "per-head" if t.dim() == 3 else "shared")


def _window_verified(kernels, q, k, v, rel_rows, rel_cols, kernel_size: int, mask: bool, config: dict) -> bool:
    """``selfcheck.verified`` for the window kernels of this call (an empty call launches nothing: True)."""
    if q.numel() == 0:
        return True
    key = (("op", "window"), ("device", q.device), ("dtype", q.dtype), ("k", None if k is None else k.dtype),
           ("v", v.dtype), ("rel_rows", _table(rel_rows)), ("rel_cols", _table(rel_cols)), ("head_dim", q.shape[-1]),
           ("kernel_size", kernel_size), ("padding", "mask" if mask else "zeros"), ("tile_fwd", config["fwd"]),
           ("tile_bwd_q", config["bwd_q"]), ("tile_bwd_kv", config["bwd_kv"]), ("vec", config["vec"]),
           ("int64", config["int64"]))
    return selfcheck.verified(
        key, lambda: _window_check(kernels, q, k, v, rel_rows, rel_cols, kernel_size, mask, config), q.device)


def _window_check(kernels, q, k, v, rel_rows, rel_cols, kernel_size: int, mask: bool, config: dict) -> str | None:
    """The self-check of one configuration (``selfcheck``'s contract): the forward and backward kernels on a small
    input of the call's dtypes, with the call's ``config`` (its tiles, heads per program, vector width and index
    width, so every compile-time constant and ``num_warps`` is the call's), against ``reference`` in float32.

    The input has one image, one tile plus one row and column of pixels (a second, partial tile each way, and
    borders; the call's own size if smaller), and as many heads as the largest heads per program. Its tensors are
    contiguous, so every offset is a multiple of the call's ``VEC`` as the kernels promise: a call's ``VEC``
    divides head_dim, the contiguous outputs' pixel or head stride. Not reproduced: Triton's own specialisation of
    integer arguments (equal to 1, divisible by 16) and pointer alignment, which follow the small input's sizes,
    strides and offsets; where they differ from the call's, the check compiles a variant of its own (once per
    machine: Triton caches compiled kernels on disk), whose code differs only in those hints. The reference runs on
    CPU: its autograd never waits for a device's backward thread (which may be the one waiting for this check)."""
    with _on_device(q):
        return _window_check_on_device(kernels, q, k, v, rel_rows, rel_cols, kernel_size, mask, config)


def _window_check_on_device(kernels, q, k, v, rel_rows, rel_cols, kernel_size, mask, config) -> str | None:
    B, H, W, heads, d = q.shape
    kinds = ("fwd", "bwd_q", "bwd_kv")
    shape = (1, min(H, max(config[c][0] for c in kinds) + 1), min(W, max(config[c][1] for c in kinds) + 1),
             max(config[c][3] for c in kinds), d)
    gen = torch.Generator().manual_seed(0)

    def rand(like: Tensor | None, size) -> Tensor | None:
        return None if like is None else torch.randn(size, generator=gen).to(q.device, like.dtype)

    def table_shape(t: Tensor | None):
        return None if t is None else (shape[3], kernel_size, d // 2)[3 - t.dim():]

    qc, kc, vc = rand(q, shape), rand(k, shape), rand(v, shape)
    rows, cols = rand(rel_rows, table_shape(rel_rows)), rand(rel_cols, table_shape(rel_cols))
    scale = d ** -0.5
    out, lse = kernels.forward(qc, kc, vc, rows, cols, kernel_size, mask, scale, config=config)
    dout = rand(out, out.shape)
    grads = kernels.backward(dout, qc, kc, vc, out, lse, rows, cols, kernel_size, mask, scale, config=config)

    leaves = [None if t is None else t.detach().cpu().float().requires_grad_() for t in (qc, kc, vc, rows, cols)]
    ref = get("reference").apply(*leaves, kernel_size, "mask" if mask else "zeros", scale)
    present = [t for t in leaves if t is not None]
    ref_grads = iter(torch.autograd.grad(ref, present, dout.cpu().float()))
    expected = [None if t is None else next(ref_grads) for t in leaves]
    got = [None if t is None else t.cpu() for t in (out, *grads)]
    names = ("out", "dq", "dk", "dv", "drel_rows", "drel_cols")
    return selfcheck.compare(dict(zip(names, zip(got, (ref, *expected)))), precision=q.dtype)


def _shifted_forward(q, k, v, rel_rows, rel_cols, kernel_size: int, mask: bool, scale: float):
    """The forward of a configuration that failed its check: ``shifted``'s custom op (autograd is off inside this
    one), the output in this op's layout; the log-sum-exp is never read (the backward falls back too)."""
    get("shifted")  # registers the sasa::shifted_* ops
    out, _probs = torch.ops.sasa.shifted_fwd(q, k, v, rel_rows, rel_cols, kernel_size, mask, scale, "eager")
    if q.stride(-1) != 1:  # channels-first q: shifted's output is (B, heads, d, H, W)
        out = out.permute(0, 3, 4, 1, 2)
    B, H, W, heads, _d = q.shape
    return out.contiguous(), torch.zeros((B, heads, H, W), dtype=torch.float32, device=q.device)


def _shifted_backward(dout, q, k, v, rel_rows, rel_cols, kernel_size: int, mask: bool, scale: float, need_kv: bool,
                      need_rows: bool, need_cols: bool):
    """The backward of a configuration that failed its check: ``shifted``'s (its probabilities recomputed)."""
    get("shifted")
    _out, probs = torch.ops.sasa.shifted_fwd(q, k, v, rel_rows, rel_cols, kernel_size, mask, scale, "eager")
    needs = [True, k is not None and need_kv, need_kv, rel_rows is not None and need_rows,
             rel_cols is not None and need_cols]
    if q.stride(-1) != 1:  # shifted's backward takes the gradient in its forward's output layout
        dout = dout.permute(0, 3, 4, 1, 2)
    grads = torch.ops.sasa.shifted_bwd(dout, q, k, v, rel_rows, rel_cols, probs, kernel_size, scale, needs, "eager")
    return tuple(g.contiguous() for g in grads)


def triton_attention(q, k, v, rel_rows, rel_cols, kernel_size, padding, scale):
    """The backend's ``apply``: shapes as in ``sasa.local_attention_2d``."""
    out, _lse = local_attention_fwd(q, k, v, rel_rows, rel_cols, int(kernel_size), padding == "mask", float(scale))
    return out


# looked up once: torch.compile cannot trace importlib, and the answer does not change while Python runs
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def _device_reason(device: torch.device) -> str | None:
    if not _TRITON_FOUND:
        return "Triton is not installed (pip install triton, Linux + CUDA)"
    if device.type == "cpu":
        if not settings.triton_interpret():
            return "needs CUDA tensors (CPU only through Triton's interpreter, TRITON_INTERPRET=1, for tests)"
    elif device.type != "cuda":
        return f"needs CUDA tensors, got device {device.type!r}"
    return None


def _can_run(q, *, k=None, rel_rows=None, rel_cols=None, kernel_size=None, padding=None, device=None,
             **_) -> str | None:
    reason = _device_reason(torch.device(device) if device is not None else q.device)
    if reason:
        return reason
    if q.dtype not in DTYPES:
        extra = " (use backend='reference' for float64 checks)" if q.dtype == torch.float64 else ""
        return f"dtype {q.dtype} is not supported, expected float32, bfloat16 or float16{extra}"
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return f"head_dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim}"
    if kernel_size is not None and kernel_size > MAX_KERNEL_SIZE:
        return f"kernel_size must be <= {MAX_KERNEL_SIZE}, got {kernel_size}"
    for name, t in (("k", k), ("rel_rows", rel_rows), ("rel_cols", rel_cols)):
        if t is not None and t.dtype not in DTYPES:
            return f"{name} dtype {t.dtype} is not supported, expected float32, bfloat16 or float16"
    return None


register(Backend(name="triton", op="window", apply=triton_attention, can_run=_can_run, priority={"cuda": 20}))


class _StemAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, pm, wv, block: int, out_dtype: torch.dtype):
        ctx.save_for_backward(x, g, pm, wv)
        ctx.block, ctx.out_dtype = block, out_dtype
        with _on_device(x):
            return kernels_for(x.device, "triton_stem_kernels").forward(x, g, pm, wv, block, out_dtype)

    @staticmethod
    def backward(ctx, dout):
        x, g, pm, wv = ctx.saved_tensors
        with _on_device(x):
            dx, dg, dpm, dwv = kernels_for(x.device, "triton_stem_kernels").backward(dout, x, g, pm, wv, ctx.block,
                                                                                     ctx.out_dtype)
        return dx if ctx.needs_input_grad[0] else None, dg, dpm, dwv, None, None


def stem_triton(x: Tensor, g: Tensor, pm: Optional[Tensor], wv: Tensor, *, block: int) -> Tensor:  # noqa: UP045
    """The stem op on the image ``x`` itself (no blocked copy); returns ``(B, C_out, H, W)`` contiguous in the
    autocast dtype (else x's); fp32 inside. A configuration that failed its self-check runs ``shifted``."""
    device = x.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    if not _stem_verified(x, g, pm, wv, block, out_dtype):
        return get("shifted", "stem").apply(x, g, pm, wv, block=block)
    with torch.autocast(device, enabled=False):
        return _StemAttention.apply(x, g.contiguous(), pm.contiguous() if pm is not None else None, wv.contiguous(),
                                    block, out_dtype)


def _channels_last(x: Tensor) -> bool:
    return x.shape[1] > 1 and x.stride(1) == 1


def _stem_verified(x, g, pm, wv, block: int, out_dtype: torch.dtype) -> bool:
    """``selfcheck.verified`` for the stem kernels of this call."""
    if x.numel() == 0:
        return True
    heads, J, D = wv.shape
    key = (("op", "stem"), ("device", x.device), ("dtype", x.dtype), ("g", g.dtype),
           ("pm", None if pm is None else pm.dtype), ("wv", wv.dtype), ("out", out_dtype),
           ("in_channels", x.shape[1]), ("heads", heads), ("mixtures", J // x.shape[1]), ("head_dim", D),
           ("block", block), ("channels_last", _channels_last(x)))
    return selfcheck.verified(key, lambda: _stem_check(x, g, pm, wv, block, out_dtype), x.device)


def _stem_check(x, g, pm, wv, block: int, out_dtype: torch.dtype) -> str | None:
    """The self-check of one stem configuration: both kernels on one 3x3-block image (two forward programs, the
    second partial; three backward ones) of the call's dtypes, channels and memory format, against ``reference``
    in float32 on CPU. The kernels' compile-time constants follow from these (``triton_stem_kernels._config``); as
    for the window op, Triton's specialisation of integer arguments follows the small input."""
    with _on_device(x):
        return _stem_check_on_device(x, g, pm, wv, block, out_dtype)


def _stem_check_on_device(x, g, pm, wv, block: int, out_dtype: torch.dtype) -> str | None:
    kernels = kernels_for(x.device, "triton_stem_kernels")
    gen = torch.Generator().manual_seed(0)

    def rand(like: Tensor | None, *size, std: float = 1.0) -> Tensor | None:
        return None if like is None else (torch.randn(size, generator=gen) * std).to(x.device, like.dtype)

    C, (heads, J, D) = x.shape[1], wv.shape
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    xc = rand(x, 1, C, 3 * block, 3 * block).contiguous(memory_format=fmt)
    gc, pmc, wvc = rand(g, C, heads * C, std=2.0), rand(pm, block * block, J // C), rand(wv, heads, J, D)
    with torch.no_grad():
        out = kernels.forward(xc, gc, pmc, wvc, block, out_dtype)
        dout = torch.randn(out.shape, generator=gen).to(x.device, out_dtype)
        grads = kernels.backward(dout, xc, gc, pmc, wvc, block, out_dtype)

    leaves = [None if t is None else t.detach().cpu().float().requires_grad_() for t in (xc, gc, pmc, wvc)]
    ref = get("reference", "stem").apply(*leaves, block=block)
    present = [t for t in leaves if t is not None]
    ref_grads = iter(torch.autograd.grad(ref, present, dout.cpu().float()))
    expected = [None if t is None else next(ref_grads) for t in leaves]
    got = [None if t is None else t.cpu() for t in (out, *grads)]
    names = ("out", "dx", "dg", "dpm", "dwv")
    return selfcheck.compare(dict(zip(names, zip(got, (ref, *expected)))), precision=out_dtype)


def _stem_can_run(x, *, block: int = 1, mixtures: int = 1, device=None, **_) -> str | None:
    """The kernels' padded 16-wide dot operands hold the input channels times the mixtures, and a block's pixels."""
    if torch.compiler.is_compiling():
        return "under torch.compile the PyTorch form runs (the compiler fuses it)"
    reason = _device_reason(torch.device(device) if device is not None else x.device)
    if reason or x.dtype not in DTYPES:
        return reason or f"dtype {x.dtype} is not supported, expected float32, bfloat16 or float16"
    if x.shape[1] * mixtures > 16:
        return f"in_channels x mixtures must be <= 16, got {x.shape[1]} x {mixtures}"
    if block * block > 16:
        return f"blocks of at most 16 pixels, got {block}x{block}"
    return None


register(Backend(name="triton", op="stem", apply=stem_triton, can_run=_stem_can_run, priority={"cuda": 20}))
