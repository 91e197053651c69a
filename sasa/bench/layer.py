"""Layer mode: the 3x3 convolution of each ResNet stage against the full ``SelfAttention2d`` layer that replaces
it (fused QKV projection included), once per backend, measured in the same run. Op mode: the same with the bare
op ``local_attention_2d`` (q, k, v strided views of one fused tensor, as the layer passes them) instead of the layer.
Stem mode: ResNet's 7x7/2 convolution stem (``conv1``) against the ``AttentionStem`` that replaces it, in its fast
form and in its textbook form (``reference_forward``), on the model-mode batch and image size.

Forward is timed under ``torch.inference_mode``; forward+backward computes the gradients of the input and of
every parameter from a fixed upstream gradient. Ratios are ``time / conv3x3 time`` of the same shape.
"""

from __future__ import annotations

import torch
from torch import nn

from ..functional import available_backends, local_attention_2d
from ..layers.attention import SelfAttention2d
from ..layers.stem import AttentionStem
from .config import DTYPES, LABELS, SLOW_BACKENDS, BenchConfig
from .timing import is_oom, peak_mb, time_ms

# Peak memory of the unfold reference in units of (k*k * B*H*W*C * element size); measured at several shapes on
# CPU: windows of K and V plus their gradients. Used only to skip it before it exhausts the GPU.
UNFOLD_MEMORY_FACTOR = 6.0


class _Op(nn.Module):
    """The bare op ``local_attention_2d`` on q, k, v viewed from one fused ``(B, 3C, H, W)`` tensor, as
    ``SelfAttention2d`` passes them (projections not included), with shared relative tables."""

    def __init__(self, channels: int, kernel_size: int, heads: int, backend: str) -> None:
        super().__init__()
        self.heads, self.head_dim, self.kernel_size, self.backend = heads, channels // heads, kernel_size, backend
        self.rel_rows = nn.Parameter(torch.randn(kernel_size, self.head_dim // 2) / self.head_dim**0.5)
        self.rel_cols = nn.Parameter(torch.randn(kernel_size, self.head_dim // 2) / self.head_dim**0.5)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        if qkv.stride(1) == 1:  # channels_last memory
            q, k, v = qkv.permute(0, 2, 3, 1).unflatten(3, (3, self.heads, self.head_dim)).unbind(3)
        else:
            q, k, v = (t.permute(0, 3, 4, 1, 2) for t in qkv.unflatten(1, (3, self.heads, self.head_dim)).unbind(1))
        return local_attention_2d(q, k, v, self.rel_rows, self.rel_cols, kernel_size=self.kernel_size,
                                  backend=self.backend)


def _measure(make: callable, x_shape: tuple, cfg: BenchConfig, *, x_dtype: torch.dtype = torch.float32) -> dict:
    """Forward ms, forward+backward ms and peak MB of ``make()`` on a random input of ``x_shape``."""
    module = cfg.to_device(make())
    x = cfg.to_device(torch.randn(x_shape, dtype=x_dtype))
    with torch.inference_mode(), cfg.autocast():
        fwd = time_ms(lambda: module(x), cfg.device, warmup=cfg.warmup, repeats=cfg.repeats)
    x.requires_grad_(True)
    with cfg.autocast():
        grad = torch.randn_like(module(x))

    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        with cfg.autocast():
            y = module(x)
        y.backward(grad)

    fwd_bwd = time_ms(step, cfg.device, warmup=cfg.warmup, repeats=cfg.repeats)
    return {"fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "peak_mb": peak_mb(step, cfg.device)}


def _guard(backend: str, B: int, H: int, W: int, C: int, cfg: BenchConfig) -> str | None:
    """Reason to skip a slow backend at this shape, or None."""
    if backend not in SLOW_BACKENDS or cfg.slow_guard_gb is None:
        return None
    elem = torch.finfo(DTYPES[cfg.dtype]).bits // 8
    estimate = UNFOLD_MEMORY_FACTOR * cfg.kernel_size**2 * B * H * W * C * elem / 2**30
    limit = cfg.slow_guard_gb
    if cfg.device.type == "cuda":
        limit = min(limit, 0.8 * torch.cuda.mem_get_info(cfg.device)[0] / 2**30)
    if estimate > limit:
        return f"skipped: needs ~{estimate:.0f} GB (guard {limit:.0f} GB)"
    return None


def layer_rows(cfg: BenchConfig, log=print, *, op: bool = False) -> list[dict]:
    """One row per (shape, implementation): the conv3x3 first, then each attention backend, as the full
    ``SelfAttention2d`` layer or (``op=True``) the bare op on q, k, v in the compute dtype (no projections)."""
    backends = cfg.backends or available_backends(cfg.device, DTYPES[cfg.dtype])
    if cfg.skip_slow:
        backends = [b for b in backends if b not in SLOW_BACKENDS]
    rows = []
    for H, W, C in cfg.shapes:
        shape = f"{H}x{W}x{C}"
        base = {"shape": shape, "batch": cfg.batch, "height": H, "width": W, "channels": C,
                "kernel_size": cfg.kernel_size, "heads": cfg.heads}
        x = ((cfg.batch, C, H, W), torch.float32)
        qkv = ((cfg.batch, 3 * C, H, W), DTYPES[cfg.dtype])  # the op's input: a projection under autocast makes it
        impls = [("conv3x3", None, lambda C=C: nn.Conv2d(C, C, 3, padding=1, bias=False), x)]
        if op:
            impls += [(f"op {LABELS.get(b, b)}", b, lambda C=C, b=b: _Op(C, cfg.kernel_size, cfg.heads, b), qkv)
                      for b in backends]
        else:
            impls += [(LABELS.get(b, b), b, lambda C=C, b=b: SelfAttention2d(C, C, cfg.kernel_size, heads=cfg.heads,
                                                                             backend=b), x) for b in backends]
        rows += _measure_rows(impls, base, cfg, log, guard=lambda b, C=C, H=H, W=W: _guard(b, cfg.batch, H, W, C, cfg))
    return rows


class _TextbookStem(nn.Module):
    """``AttentionStem.reference_forward`` as a module (q / k / v formulation)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = AttentionStem(3, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem.reference_forward(x)


def stem_rows(cfg: BenchConfig, log=print) -> list[dict]:
    """ResNet's ``conv1`` (7x7/2, 3 -> 64) against ``AttentionStem(3, 64)`` (the reassociated PyTorch op, on CUDA also
    its Triton kernels, and the textbook form), one image batch of the model-mode size. The attention stem's output
    is at full resolution (the model pools it by 4)."""
    B, S = cfg.model_batch, cfg.model_image_size
    base = {"shape": f"{S}x{S}x3", "batch": B, "height": S, "width": S, "channels": 3}
    x = ((B, 3, S, S), torch.float32)
    impls = [("conv7x7/2 stem", None, lambda: nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), x),
             ("attention stem", "stem", lambda: AttentionStem(3, 64, backend="shifted"), x),
             ("attention stem textbook", "stem_reference", _TextbookStem, x)]
    if cfg.device.type == "cuda":  # the Triton kernels (the default there); on CPU they would be interpreted
        impls.insert(2, ("attention stem triton", "stem_triton", lambda: AttentionStem(3, 64, backend="triton"), x))
    return _measure_rows(impls, base, cfg, log)


def _measure_rows(impls, base: dict, cfg: BenchConfig, log, *, guard=None) -> list[dict]:
    """Measure each ``(label, backend, make, (input shape, input dtype))``; the first (backend None) is the
    convolution the ratios refer to."""
    rows, conv = [], None
    for label, backend, make, (shape, dtype) in impls:
        row = {**base, "impl": label, "backend": backend, "error": None}
        reason = guard(backend) if (guard and backend) else None
        if reason:
            row["error"] = reason
        else:
            try:
                row.update(_measure(make, shape, cfg, x_dtype=dtype))
            except Exception as err:  # noqa: BLE001  (a failing backend is a row, not a crash)
                row["error"] = "OOM" if is_oom(err) else f"{type(err).__name__}: {err}".splitlines()[0][:200]
                if cfg.device.type == "cuda":
                    torch.cuda.empty_cache()
        if backend is None and row["error"] is None:
            conv = row
        if conv is not None and row["error"] is None:
            row["fwd_vs_conv"] = row["fwd_ms"]["median"] / conv["fwd_ms"]["median"]
            row["fwd_bwd_vs_conv"] = row["fwd_bwd_ms"]["median"] / conv["fwd_bwd_ms"]["median"]
        rows.append(row)
        log(_progress(row))
    return rows


def _progress(row: dict) -> str:
    head = f"  {row['shape']:>12} {row['impl']:<23}"
    if row["error"]:
        return f"{head} {row['error']}"
    return f"{head} fwd {row['fwd_ms']['median']:8.3f} ms  fwd+bwd {row['fwd_bwd_ms']['median']:8.3f} ms"
