"""Layer mode: the 3x3 convolution of each ResNet stage against the full ``SelfAttention2d`` layer that replaces
it (fused QKV projection included), once per backend, measured in the same run.

Forward is timed under ``torch.inference_mode``; forward+backward computes the gradients of the input and of
every parameter from a fixed upstream gradient. Ratios are ``time / conv3x3 time`` of the same shape.

Status: complete.
"""

from __future__ import annotations

import torch
from torch import nn

from ..functional import available_backends
from ..layers.attention import SelfAttention2d
from .config import DTYPES, LABELS, SLOW_BACKENDS, BenchConfig
from .timing import is_oom, peak_mb, time_ms

# Peak memory of the unfold reference in units of (k*k * B*H*W*C * element size); measured at several shapes on
# CPU: windows of K and V plus their gradients. Used only to skip it before it exhausts the GPU.
UNFOLD_MEMORY_FACTOR = 6.0


def _measure(make: callable, x_shape: tuple, cfg: BenchConfig) -> dict:
    """Forward ms, forward+backward ms and peak MB of ``make()`` on a random input of ``x_shape``."""
    module = cfg.to_device(make())
    x = cfg.to_device(torch.randn(x_shape))
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


def layer_rows(cfg: BenchConfig, log=print) -> list[dict]:
    """One row per (shape, implementation): the conv3x3 first, then each attention backend."""
    backends = cfg.backends or available_backends(cfg.device, DTYPES[cfg.dtype])
    if cfg.skip_slow:
        backends = [b for b in backends if b not in SLOW_BACKENDS]
    rows = []
    for H, W, C in cfg.shapes:
        shape = f"{H}x{W}x{C}"
        base = {"shape": shape, "batch": cfg.batch, "height": H, "width": W, "channels": C,
                "kernel_size": cfg.kernel_size, "heads": cfg.heads}
        impls = [("conv3x3", None, lambda C=C: nn.Conv2d(C, C, 3, padding=1, bias=False))]
        impls += [(LABELS.get(b, b), b, lambda C=C, b=b: SelfAttention2d(C, C, cfg.kernel_size, heads=cfg.heads,
                                                                         backend=b)) for b in backends]
        conv = None
        for label, backend, make in impls:
            row = {**base, "impl": label, "backend": backend, "error": None}
            reason = _guard(backend, cfg.batch, H, W, C, cfg) if backend else None
            if reason:
                row["error"] = reason
            else:
                try:
                    row.update(_measure(make, (cfg.batch, C, H, W), cfg))
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
    head = f"  layer {row['shape']:>12} {row['impl']:<20}"
    if row["error"]:
        return f"{head} {row['error']}"
    return f"{head} fwd {row['fwd_ms']['median']:8.3f} ms  fwd+bwd {row['fwd_bwd_ms']['median']:8.3f} ms"
