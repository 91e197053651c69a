"""``SelfAttention2d``: the SASA layer, a drop-in replacement for a k x k ``nn.Conv2d`` (NCHW in, NCHW out).

Paper: Ramachandran et al., "Stand-Alone Self-Attention in Vision Models", NeurIPS 2019 (arXiv 1906.05909).
Decisions the paper leaves open, taken as SPEC section 1 states them:
- Q, K and V are dense bias-free 1x1 projections ``in_channels -> out_channels``, split into heads after
  projecting; there is no output projection (the only reading that reproduces the paper's parameter counts).
- Relative embeddings: one (rel_rows, rel_cols) pair of ``(kernel_size, head_dim // 2)`` tables shared by all
  heads by default (``rel_per_head=True`` for one pair per head), initialised N(0, 1/head_dim).
- ``scale=1.0`` (no 1/sqrt(d)); ``padding="zeros"`` (out-of-image keys/values are zero but stay in the softmax).
- Stride s > 1: attention at stride 1, then an s x s average pool with stride s (the FLOP counts confirm this),
  in ceil mode so an odd map gives ceil(H / s) rows like the strided 3x3 conv and 1x1 shortcut it sits beside.

The three projections run as one fused 1x1 convolution; q, k, v are strided channels-last views of its output, so
no copy is made between the projection and the op. ``recompute_qkv=True`` drops that output after the forward and
recomputes it in the backward (``recompute.py``): less memory, one more 1x1 projection.

``forward`` dispatches through ``sasa.local_attention_2d``'s backends in eager mode and under ``torch.compile``.
While ``torch.jit.script`` compiles the layer, ``torch.jit.trace`` / the TorchScript ONNX exporter record it or
``torch.export`` (and the dynamo ONNX exporter) traces it, it runs ``forward_portable`` instead: the same maths in
standard operators only (``sasa.functional.window_attention_portable``, ``sasa/backends/portable.py``), which every
exporter and runtime takes."""

from __future__ import annotations

import contextlib
import math
from typing import Optional  # TorchScript reads typing.Optional on every supported torch, not "X | None"

import torch
from torch import nn

from ..functional import (
    PADDING_MODES,
    attention_probs,
    check_kernel_size,
    local_attention_2d,
    window_attention_portable,
)
from .positional import sinusoidal_2d
from .recompute import recompute_saved_views

POSITIONAL = ("relative", "absolute", "none")


def portable_mode() -> bool:
    """True while an exporter records the model: ``torch.jit.trace`` (and the TorchScript ONNX exporter) or
    ``torch.export`` (and the dynamo ONNX exporter). The layers then take their standard-operator path."""
    if torch.jit.is_tracing():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.6
    return bool(is_exporting is not None and is_exporting())


class SelfAttention2d(nn.Module):
    """Local k x k multi-head self-attention over a feature map.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output; must be divisible by ``heads``.
        kernel_size: odd window size (the paper uses 7).
        stride: 1, or s > 1 for an s x s average pool after the attention.
        heads: attention heads; ``head_dim = out_channels // heads``.
        padding: ``"zeros"`` or ``"mask"`` (see ``sasa.local_attention_2d``).
        scale: logit scale, 1.0 by default.
        positional: ``"relative"`` (default), ``"absolute"`` (2D sinusoidal encoding added to the projections'
            input) or ``"none"``.
        query_key: ``True`` for q.k + q.r logits; ``False`` for q.r-only logits with no key projection.
        rel_per_head: one pair of relative tables per head instead of one shared pair.
        backend: backend name for the op, ``None`` for the automatic choice.
        recompute_qkv: keep only the projection's input for the backward and recompute q, k, v there (saves
            3 x out_channels values per pixel for backends that keep their inputs, e.g. ``triton``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 7,
        stride: int = 1,
        heads: int = 8,
        *,
        padding: str = "zeros",
        scale: float = 1.0,
        positional: str = "relative",
        query_key: bool = True,
        rel_per_head: bool = False,
        backend: str | None = None,
        recompute_qkv: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("heads", heads),
                            ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if out_channels % heads:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by heads ({heads})")
        check_kernel_size(kernel_size)
        if padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
        if positional not in POSITIONAL:
            raise ValueError(f"positional must be one of {POSITIONAL}, got {positional!r}")
        head_dim = out_channels // heads
        if positional == "relative" and head_dim % 2:
            raise ValueError(
                f"relative embeddings split head_dim in two halves, so out_channels / heads must be even, "
                f"got head_dim={head_dim} (out_channels={out_channels}, heads={heads})"
            )
        if not query_key and positional != "relative":
            raise ValueError("query_key=False (q.r-only logits) needs positional='relative'")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.heads, self.head_dim = kernel_size, stride, heads, head_dim
        self.padding, self.scale, self.positional = padding, float(scale), positional
        self.query_key, self.rel_per_head, self.backend = query_key, rel_per_head, backend
        self.recompute_qkv = bool(recompute_qkv)
        self.num_proj = 3 if query_key else 2
        # one GEMM for q, (k,) v: (B, C_in, H, W) -> (B, num_proj * C_out, H, W)
        self.qkv = nn.Conv2d(in_channels, self.num_proj * out_channels, kernel_size=1, bias=False)
        if positional == "relative":
            shape = (heads, kernel_size, head_dim // 2) if rel_per_head else (kernel_size, head_dim // 2)
            self.rel_rows = nn.Parameter(torch.empty(shape))
            self.rel_cols = nn.Parameter(torch.empty(shape))
        else:
            self.register_parameter("rel_rows", None)
            self.register_parameter("rel_cols", None)
        # ceil_mode: odd maps give ceil(H / s) like a strided conv, so the residual shortcut's shape matches
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projections: Kaiming-uniform like ``nn.Conv2d``; relative tables N(0, 1/head_dim)."""
        self.qkv.reset_parameters()
        if self.rel_rows is not None:
            std = 1.0 / math.sqrt(self.head_dim)
            nn.init.normal_(self.rel_rows, std=std)
            nn.init.normal_(self.rel_cols, std=std)

    @property
    def value_weight(self) -> torch.Tensor:
        """The rows of the fused projection weight that produce the values, ``(C_out, C_in, 1, 1)``."""
        return self.qkv.weight[(self.num_proj - 1) * self.out_channels :]

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """Checks ``x`` and adds the absolute position encoding when the layer uses one."""
        if x.dim() != 4:
            raise ValueError(f"SelfAttention2d expects a (B, C, H, W) input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"SelfAttention2d expects {self.in_channels} input channels, got {x.shape[1]}")
        if self.positional == "absolute":
            x = x + sinusoidal_2d(self.in_channels, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
        return x

    def _split(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Projection ``(B, P*C_out, H, W)`` -> channels-last views q, k (or None), v of ``(B, H, W, heads, d)``."""
        # unbind (not indexing) so the backward stacks the three gradients in one copy, and unbind along the dim
        # that keeps that copy in y's own memory format (no NCHW <-> NHWC conversion in the projection's backward)
        if y.stride(1) == 1 and y.shape[1] > 1:  # channels_last memory: (B, H, W, P, heads, d) views
            parts = y.permute(0, 2, 3, 1).unflatten(3, (self.num_proj, self.heads, self.head_dim)).unbind(3)
        else:  # NCHW memory: (B, P, heads, d, H, W) views, permuted to (B, H, W, heads, d)
            parts = [t.permute(0, 3, 4, 1, 2) for t in y.unflatten(1, (self.num_proj, self.heads, self.head_dim))
                     .unbind(1)]
        q, v = parts[0], parts[-1]
        k = parts[1] if self.query_key else None
        return q, k, v

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Input ``(B, C_in, H, W)`` -> channels-last views q, k (or None), v of ``(B, H, W, heads, head_dim)``."""
        return self._split(self.qkv(self._input(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.forward_portable(x)
        else:
            return self._forward_dispatch(x)

    def forward_portable(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` in standard operators (``window_attention_portable``): what scripting and export run."""
        torch._assert(x.dim() == 4, "SelfAttention2d expects a (B, C, H, W) input")
        torch._assert(x.shape[1] == self.in_channels, "SelfAttention2d: the input's channels differ from in_channels")
        if self.positional == "absolute":
            x = x + sinusoidal_2d(self.in_channels, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
        y = self.qkv(x)  # (B, P*C_out, H, W)
        y = y.view(y.shape[0], self.num_proj, self.heads, self.head_dim, y.shape[2], y.shape[3])
        k: Optional[torch.Tensor] = None  # noqa: UP045
        if self.query_key:
            k = y[:, 1]
        out = window_attention_portable(y[:, 0], k, y[:, self.num_proj - 1], self.rel_rows, self.rel_cols,
                                        self.kernel_size, self.padding == "mask", self.scale)
        return self.pool(out.flatten(1, 2))  # (B, heads, d, H, W) -> (B, C_out, H, W), then the stride's pool

    @torch.jit.unused
    def _forward_dispatch(self, x: torch.Tensor) -> torch.Tensor:
        if portable_mode():
            return self.forward_portable(x)
        x = self._input(x)
        y = self.qkv(x)  # (B, P*C_out, H, W)
        recompute = self.recompute_qkv and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        with recompute_saved_views(y, lambda: self.qkv(x), guard=x) if recompute else contextlib.nullcontext():
            out = local_attention_2d(*self._split(y), self.rel_rows, self.rel_cols, kernel_size=self.kernel_size,
                                     padding=self.padding, scale=self.scale, backend=self.backend)
        out = out.flatten(3).permute(0, 3, 1, 2)  # (B, H, W, heads*d) -> (B, C_out, H, W), channels_last memory
        return self.pool(out)

    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax weights for input ``x``: ``(B, H, W, heads, k, k)`` at the pre-pool resolution.

        Entry ``[..., a, b]`` is the weight of the neighbour at offset ``(a - k//2, b - k//2)``.
        Computed with the reference backend, whatever ``backend`` the layer uses for its forward.
        """
        q, k, _ = self.project(x)
        return attention_probs(q, k, self.rel_rows, self.rel_cols, kernel_size=self.kernel_size, padding=self.padding,
                               scale=self.scale)

    def extra_repr(self) -> str:
        parts = [f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}", f"heads={self.heads}"]
        if self.stride != 1:
            parts.append(f"stride={self.stride}")
        if self.padding != "zeros":
            parts.append(f"padding={self.padding!r}")
        if self.scale != 1.0:
            parts.append(f"scale={self.scale}")
        if self.positional != "relative":
            parts.append(f"positional={self.positional!r}")
        if not self.query_key:
            parts.append("query_key=False")
        if self.rel_per_head:
            parts.append("rel_per_head=True")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        if self.recompute_qkv:
            parts.append("recompute_qkv=True")
        return ", ".join(parts)
