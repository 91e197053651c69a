"""``AttentionStem``: the paper's attention replacement for ResNet's 7x7/2 convolution stem (SPEC section 2).

Self-attention inside each non-overlapping ``block_size x block_size`` block, ``heads`` heads, content-only logits
q.k: spatial information enters through the values (``values=``): ``"spatial"`` (default, the paper's
spatially-aware values, ``v_ab = (sum_m p(a,b,m) W_V^m) x_ab`` with ``p(a,b,.) = softmax_m((emb_row[a] +
emb_col[b]) . nu_m)``; ``mixtures=4`` and ``embed_dim=16`` are our choices), ``"plain"`` (``v = W_V x``, the
ablation's weak baseline) or ``"conv"`` (values from a ``conv_kernel`` convolution, our reading).

``forward`` runs spatial and plain values through ``sasa.functional.stem_attention``, an exact reassociation around
the 3-channel input that never forms q / k / v (about 3x faster, half the peak memory on CPU; Triton kernels on
CUDA), dispatched by the backend registry like ``local_attention_2d``; ``reference_forward`` is the textbook
formulation, the tests' oracle and the conv-values path. While ``torch.jit.script`` compiles the stem or an exporter
records it (``torch.jit.trace``, ``torch.export``, ``torch.onnx.export``), ``forward`` runs ``forward_portable``, the
textbook formulation in standard operators (two matmuls and a softmax per block and head). The model adds BatchNorm,
ReLU and the 4x4/4 max pool; input sides must be multiples of ``block_size``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from ..functional import stem_attention
from .attention import portable_mode

STEM_VALUES = ("spatial", "plain", "conv")


def _block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over many tiny sequences, ``(B, N, L, d)`` each (``reference_forward``).

    On CPU, SDPA (its flash kernel). On CUDA the explicit two-matmul form, the one path seen to work there: on an
    H200, cuDNN's SDPA rejected this shape in bf16 (N ~ 16k sequences of 16 tokens), and the flash /
    memory-efficient kernels asked for by name hit an illegal memory access inside a sasa_resnet50 training step.
    """
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


class AttentionStem(nn.Module):
    """Block-local multi-head self-attention at full input resolution.

    Args:
        in_channels: image channels (3 for RGB).
        out_channels: output channels (64 in the paper); divisible by ``heads``.
        block_size: side of the non-overlapping attention blocks (4).
        heads: attention heads (4).
        values: ``"spatial"``, ``"plain"`` or ``"conv"``.
        mixtures: number m of value matrices for spatially-aware values.
        embed_dim: width of the row / column / mixture embeddings for spatially-aware values.
        conv_kernel: kernel size of the value convolution for ``values="conv"``.
        scale: logit scale (1.0, as in the layers).
        backend: the ``stem`` op's backend for spatial / plain values (``"shifted"``, ``"triton"``, ``"reference"``,
            see ``sasa.backends``); None: Triton on CUDA, else ``shifted`` (``SASA_STEM_BACKEND`` overrides that).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 64, *, block_size: int = 4, heads: int = 4,
                 values: str = "spatial", mixtures: int = 4, embed_dim: int = 16, conv_kernel: int = 3,
                 scale: float = 1.0, backend: str | None = None) -> None:
        super().__init__()
        if backend is not None:
            backends.get(backend, "stem")  # an unknown name fails here, naming the valid ones
        self.backend = backend
        if out_channels % heads:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by heads ({heads})")
        if values not in STEM_VALUES:
            raise ValueError(f"values must be one of {STEM_VALUES}, got {values!r}")
        if block_size < 1 or mixtures < 1:
            raise ValueError(f"block_size and mixtures must be >= 1, got {block_size} and {mixtures}")
        self.in_channels, self.out_channels, self.block_size, self.heads = in_channels, out_channels, block_size, heads
        self.values, self.mixtures, self.scale = values, mixtures, float(scale)
        self.query = nn.Linear(in_channels, out_channels, bias=False)
        self.key = nn.Linear(in_channels, out_channels, bias=False)
        if values == "spatial":
            self.value_weight = nn.Parameter(torch.empty(mixtures, out_channels, in_channels))  # W_V^m
            self.emb_row = nn.Parameter(torch.empty(block_size, embed_dim))
            self.emb_col = nn.Parameter(torch.empty(block_size, embed_dim))
            self.emb_mix = nn.Parameter(torch.empty(mixtures, embed_dim))  # nu_m
        elif values == "plain":
            self.value = nn.Linear(in_channels, out_channels, bias=False)
        else:
            self.value = nn.Conv2d(in_channels, out_channels, conv_kernel, padding=conv_kernel // 2, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.query.reset_parameters()
        self.key.reset_parameters()
        if self.values == "spatial":
            bound = 1.0 / math.sqrt(self.in_channels)
            nn.init.uniform_(self.value_weight, -bound, bound)
            for emb in (self.emb_row, self.emb_col, self.emb_mix):
                nn.init.normal_(emb, std=1.0 / math.sqrt(emb.shape[1]))
        else:
            self.value.reset_parameters()

    def mixture_weights(self) -> torch.Tensor:
        """p(a, b, m) as a ``(block_size * block_size, mixtures)`` tensor (row-major positions)."""
        pos = (self.emb_row[:, None, :] + self.emb_col[None, :, :]).flatten(0, 1)  # (s*s, e)
        return torch.softmax(pos @ self.emb_mix.t(), dim=-1)  # (s*s, m)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/s, W/s, s*s, C)."""
        B, C, H, W = x.shape
        s = self.block_size
        x = x.view(B, C, H // s, s, W // s, s)  # (B, C, Hb, s, Wb, s)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(B, H // s, W // s, s * s, C)  # (B, Hb, Wb, s*s, C)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"AttentionStem expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        s = self.block_size
        if x.shape[2] % s or x.shape[3] % s:
            raise ValueError(f"AttentionStem needs height and width divisible by block_size={s}, "
                             f"got {x.shape[2]}x{x.shape[3]}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C_out, H, W)``: the reassociated op for spatial / plain values (exact, see
        ``sasa/backends/stem.py``), ``reference_forward`` for conv values (their values are not linear in one pixel);
        ``forward_portable`` when scripted or exported."""
        if torch.jit.is_scripting():
            return self.forward_portable(x)
        else:
            return self._forward_dispatch(x)

    @torch.jit.unused
    def _forward_dispatch(self, x: torch.Tensor) -> torch.Tensor:
        if portable_mode():
            return self.forward_portable(x)
        if self.values == "conv":
            return self.reference_forward(x)
        self._check(x)
        C, s, heads = x.shape[1], self.block_size, self.heads
        d = self.out_channels // heads
        wq, wk = self.query.weight.view(heads, d, C), self.key.weight.view(heads, d, C)
        g = torch.einsum("hoc,hoe->che", wq, wk).reshape(C, heads * C) * self.scale  # G_h = W_Q,h^T W_K,h
        if self.values == "spatial":
            pm = self.mixture_weights()  # (s*s, m)
            wv = self.value_weight.view(self.mixtures, heads, d, C).permute(1, 0, 3, 2)  # (heads, m, C_in, d)
        else:
            pm = None
            wv = self.value.weight.view(heads, d, C).transpose(1, 2)  # (heads, C_in, d)
        return stem_attention(x, g, pm, wv.reshape(heads, -1, d), block=s, backend=self.backend)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The textbook formulation: q, k, v projections of every pixel, softmax(q k^T) v per block and head.

        The oracle the fast path is tested against, and the path of conv values.
        """
        self._check(x)
        q, k, v = self._sequences(x)
        return self._merge(_block_attention(q, k, v, self.scale), x)

    def forward_portable(self, x: torch.Tensor) -> torch.Tensor:
        """``reference_forward`` with the attention as two matmuls and a softmax: scriptable and exportable."""
        torch._assert(x.dim() == 4, "AttentionStem expects a (B, C, H, W) input")
        torch._assert(x.shape[1] == self.in_channels, "AttentionStem: the input's channels differ from in_channels")
        torch._assert(x.shape[2] % self.block_size == 0 and x.shape[3] % self.block_size == 0,
                      "AttentionStem needs height and width divisible by block_size")
        q, k, v = self._sequences(x)
        return self._merge(torch.softmax((q @ k.transpose(-1, -2)) * self.scale, dim=-1) @ v, x)

    def _fold(self, t: torch.Tensor) -> torch.Tensor:
        """(B, Hb, Wb, s*s, C_out) -> (B, Hb*Wb*heads, s*s, d): every block-head is one sequence."""
        return t.unflatten(-1, (self.heads, self.out_channels // self.heads)).transpose(-2, -3).flatten(1, 3)

    def _sequences(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of every block and head, ``(B, Hb*Wb*heads, s*s, d)`` each."""
        xb = self._blocks(x)  # (B, Hb, Wb, s*s, C_in)
        if hasattr(self, "value_weight"):  # spatial values (hasattr: TorchScript resolves it when compiling)
            w = torch.einsum("pm,moc->poc", self.mixture_weights(), self.value_weight)  # (s*s, C_out, C_in)
            v = torch.einsum("bhwpc,poc->bhwpo", xb, w)  # (B, Hb, Wb, s*s, C_out)
        elif self.values == "plain":
            v = self.value(xb)
        else:
            v = self._blocks(self.value(x))
        return self._fold(self.query(xb)), self._fold(self.key(xb)), self._fold(v)

    def _merge(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, Hb*Wb*heads, s*s, d) -> (B, C_out, H, W) for input ``x``."""
        B, H, W, s = x.shape[0], x.shape[2], x.shape[3], self.block_size
        out = out.unflatten(1, (H // s, W // s, self.heads)).transpose(-2, -3)  # (B, Hb, Wb, s*s, heads, d)
        out = out.reshape(B, H // s, W // s, s, s, self.out_channels)  # (B, Hb, Wb, s, s, C_out)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(B, self.out_channels, H, W)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, block_size={self.block_size}, heads={self.heads}, "
                f"values={self.values!r}" + (f", mixtures={self.mixtures}" if self.values == "spatial" else ""))
