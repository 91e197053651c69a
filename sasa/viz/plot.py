"""Draw the k x k attention windows of one SASA layer over the input image (matplotlib, no pyplot state).

One row per query pixel: the input with the query marked and its window outlined, then one panel per head and one
for their mean, each weight drawn over the block of image pixels its feature-map cell covers (cell (i, j) of an
``h x w`` map: ``[i * H / h, (i + 1) * H / h) x [j * W / w, (j + 1) * W / w)``). One colour scale for all panels.
The weight on window cells outside the map (``padding="zeros"`` keeps them in the softmax) is printed in the panel
title as "off-map"."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def query_cell(pixel: tuple[int, int], image_size: tuple[int, int], map_size: tuple[int, int]) -> tuple[int, int]:
    """The feature-map cell ``(i, j)`` of an ``map_size`` map that covers image pixel ``pixel = (y, x)``."""
    (y, x), (H, W), (h, w) = pixel, image_size, map_size
    if not (0 <= y < H and 0 <= x < W):
        raise ValueError(f"pixel (y, x) = {pixel} lies outside the {H}x{W} image (expected 0 <= y < {H}, 0 <= x < {W})")
    return min(h - 1, y * h // H), min(w - 1, x * w // W)


def plot_attention(image: np.ndarray, weights: torch.Tensor, pixels: Sequence[tuple[int, int]], *,
                   title: str | None = None, cmap: str = "inferno", alpha: float = 0.75):
    """A matplotlib ``Figure`` of the attention windows of every head (and their mean) for each query pixel.

    Args:
        image: the input as shown to the model, ``(H, W)`` grayscale or ``(H, W, 3)`` RGB, uint8 or floats in [0, 1].
        weights: one image's weights from ``sasa.attention_maps``: ``(h, w, heads, k, k)`` at the layer's input
            resolution.
        pixels: query pixels ``(y, x)`` in image coordinates.
        alpha: opacity of the weights over the image.
    """
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if weights.dim() != 5 or weights.shape[-1] != weights.shape[-2]:
        raise ValueError(f"weights must be (h, w, heads, k, k) for one image, got shape {tuple(weights.shape)}")
    if not pixels:
        raise ValueError("pixels must name at least one query pixel (y, x)")
    image = np.asarray(image)
    H, W = image.shape[:2]
    h, w, heads, k, _ = weights.shape
    r = k // 2
    sy, sx = H / h, W / w  # image pixels per feature-map cell
    weights = weights.detach().float().cpu()
    cells = [query_cell(p, (H, W), (h, w)) for p in pixels]
    windows = [torch.cat([weights[i, j], weights[i, j].mean(0, keepdim=True)]).numpy() for i, j in cells]
    norm = Normalize(vmin=0.0, vmax=float(max(win.max() for win in windows)))

    ncols = heads + 2
    fig = Figure(figsize=(1.7 * ncols + 0.8, 1.9 * len(pixels) + 0.4), layout="constrained")  # no pyplot state
    axes = fig.subplots(len(pixels), ncols, squeeze=False)
    show = {"cmap": "gray" if image.ndim == 2 else None, "extent": (0, W, H, 0), "interpolation": "nearest"}
    heat = None
    for row, ((y, x), (i, j), win) in enumerate(zip(pixels, cells, windows)):
        extent = ((j - r) * sx, (j + r + 1) * sx, (i + r + 1) * sy, (i - r) * sy)  # left, right, bottom, top
        rows_in = (np.arange(i - r, i + r + 1) >= 0) & (np.arange(i - r, i + r + 1) < h)
        cols_in = (np.arange(j - r, j + r + 1) >= 0) & (np.arange(j - r, j + r + 1) < w)
        inside = rows_in[:, None] & cols_in[None, :]
        ax = axes[row, 0]
        ax.imshow(image, **show)
        ax.add_patch(Rectangle((extent[0], extent[3]), extent[1] - extent[0], extent[2] - extent[3], fill=False,
                               edgecolor="cyan", linewidth=1.2))
        ax.set_title(f"query (y={y}, x={x})", fontsize=8)
        for col in range(heads + 1):
            ax = axes[row, col + 1]
            ax.imshow(image, alpha=0.6, **show)
            heat = ax.imshow(win[col], cmap=cmap, norm=norm, alpha=alpha, extent=extent, interpolation="nearest")
            off = 1.0 - float(win[col][inside].sum())
            name = f"head {col}" if col < heads else "mean"
            ax.set_title(name + (f" ({off:.0%} off-map)" if off >= 0.005 else ""), fontsize=8)
        for ax in axes[row]:
            ax.plot([x + 0.5], [y + 0.5], marker="+", color="cyan", markersize=7, markeredgewidth=1.5)
            ax.set_xlim(0, W)
            ax.set_ylim(H, 0)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(heat, ax=axes.ravel().tolist(), shrink=0.9, label="attention weight")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
