"""2D sinusoidal absolute position encoding, for the paper's ``positional="absolute"`` ablation.

The first ``C // 2`` channels encode the row, the rest the column, each with the Transformer's sin/cos pairs
at geometrically spaced frequencies (base 10000). The paper names the ablation but not the encoding's details;
this is our choice (SPEC section 1)."""

from __future__ import annotations

from typing import Optional

import torch


def _encode_1d(positions: torch.Tensor, channels: int) -> torch.Tensor:
    """positions (N,) -> (channels, N): sin in even channels, cos in odd ones."""
    pairs = (channels + 1) // 2
    freq = torch.exp(-torch.arange(pairs, dtype=torch.float32) * (torch.log(torch.tensor(10000.0)) / max(pairs, 1)))
    angles = freq[:, None] * positions[None, :].float()  # (pairs, N)
    enc = torch.stack((angles.sin(), angles.cos()), dim=1).flatten(0, 1)  # (2 * pairs, N)
    return enc[:channels]


def sinusoidal_2d(channels: int, height: int, width: int, device: Optional[torch.device] = None,  # noqa: UP045
                  dtype: Optional[torch.dtype] = None) -> torch.Tensor:  # noqa: UP045
    """A ``(1, channels, height, width)`` encoding of each pixel's (row, column) (scriptable: no keyword-only
    arguments, typing.Optional)."""
    rows_c = channels // 2
    rows = _encode_1d(torch.arange(height), rows_c)  # (rows_c, H)
    cols = _encode_1d(torch.arange(width), channels - rows_c)  # (C - rows_c, W)
    enc = torch.cat((rows[:, :, None].expand(-1, -1, width), cols[:, None, :].expand(-1, height, -1)), dim=0)
    return enc[None].to(device=device, dtype=dtype)
