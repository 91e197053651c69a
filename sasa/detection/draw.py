"""Drawings of detections: boxes, class names and scores on the image (``draw_bounding_boxes``), saved as PNG;
ground-truth boxes as thin white outlines underneath for comparison."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4",
           "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075"]


def draw_detections(image: torch.Tensor, detection: dict, class_names: Sequence[str], *,
                    score_thresh: float = 0.3, gt_boxes: torch.Tensor | None = None,
                    width: int = 2) -> torch.Tensor:
    """``image`` (``(3, H, W)`` float in [0, 1] or uint8) with ``detection`` drawn, ``(3, H, W)`` uint8.

    Args:
        detection: ``boxes`` (N, 4) xyxy in the image's pixels, ``scores`` (N,), ``labels`` (N,) contiguous.
        score_thresh: detections below this score are not drawn.
        gt_boxes: ground-truth boxes (M, 4), drawn as thin white outlines.
    """
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be (3, H, W) or (1, H, W), got shape {tuple(image.shape)}")
    if image.dtype != torch.uint8:
        image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    image = image.cpu().expand(3, -1, -1)
    if gt_boxes is not None and len(gt_boxes):
        image = draw_bounding_boxes(image, gt_boxes.detach().cpu().float(), colors="white", width=1)
    keep = detection["scores"].detach().cpu() >= score_thresh
    boxes = detection["boxes"].detach().cpu().float()[keep]
    labels = detection["labels"].detach().cpu()[keep].tolist()
    scores = detection["scores"].detach().cpu()[keep].tolist()
    if not labels:
        return image
    names = [class_names[i] if 0 <= i < len(class_names) else str(i) for i in labels]
    text = [f"{n} {s:.2f}" for n, s in zip(names, scores)]
    colors = [PALETTE[i % len(PALETTE)] for i in labels]
    return draw_bounding_boxes(image, boxes, labels=text, colors=colors, width=width)


def save_detections(path: str | os.PathLike, image: torch.Tensor, detection: dict, class_names: Sequence[str],
                    **kwargs) -> Path:
    """Draw (``draw_detections``) and write a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    drawn = draw_detections(image, detection, class_names, **kwargs)
    Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(path)  # (3, H, W) -> (H, W, 3)
    return path
