"""A tiny synthetic COCO-format detection dataset (coloured shapes on noise) for the detection tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image

SHAPES = {1: "rectangle", 3: "disc", 7: "cross"}  # sparse ids on purpose, like COCO's
_COLOURS = {1: (230, 60, 40), 3: (40, 200, 70), 7: (60, 90, 240)}


def write_shapes_coco(root: str | os.PathLike, num_images: int = 64, *, image_size: int = 96,
                      max_objects: int = 3, min_box: int = 16, max_box: int = 44, seed: int = 0,
                      ann_name: str = "instances.json") -> Path:
    """Write a synthetic COCO-format dataset of coloured shapes on noise; returns the JSON's path.

    Images are ``root/images/NNNNN.png``; categories are ``SHAPES`` (ids 1, 3, 7); 1 to ``max_objects``
    non-overlapping objects per image, sides drawn from [``min_box``, ``max_box``] pixels.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    images, annotations = [], []
    yy, xx = torch.meshgrid(torch.arange(image_size), torch.arange(image_size), indexing="ij")
    for i in range(num_images):
        img = (torch.rand(3, image_size, image_size, generator=g) * 60 + 70).to(torch.uint8)
        n = int(torch.randint(1, max_objects + 1, (1,), generator=g))
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(20 * n):  # rejection sampling: objects do not overlap
            if len(placed) == n:
                break
            cat = list(SHAPES)[int(torch.randint(0, len(SHAPES), (1,), generator=g))]
            w, h = (int(v) for v in torch.randint(min_box, max_box + 1, (2,), generator=g))
            x0 = int(torch.randint(0, image_size - w + 1, (1,), generator=g))
            y0 = int(torch.randint(0, image_size - h + 1, (1,), generator=g))
            if any(x0 < bx + bw and bx < x0 + w and y0 < by + bh and by < y0 + h for bx, by, bw, bh in placed):
                continue
            placed.append((x0, y0, w, h))
            inside = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
            if SHAPES[cat] == "disc":
                cx, cy = x0 + (w - 1) / 2, y0 + (h - 1) / 2
                inside = ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 <= 1.0
            elif SHAPES[cat] == "cross":
                bar_w, bar_h = max(2, w // 3), max(2, h // 3)
                cx, cy = x0 + w // 2, y0 + h // 2
                inside = inside & (((xx - cx).abs() <= bar_w // 2) | ((yy - cy).abs() <= bar_h // 2))
            colour = torch.tensor(_COLOURS[cat], dtype=torch.float32)
            colour = (colour + torch.randn(3, generator=g) * 15).clamp(0, 255).to(torch.uint8)
            img[:, inside] = colour[:, None]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat,
                                "bbox": [x0, y0, w, h], "area": float(w * h), "iscrowd": 0})
        name = f"{i:05d}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / "images" / name)
        images.append({"id": i + 1, "file_name": name, "width": image_size, "height": image_size})
    cats = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in SHAPES.items()]
    ann_path = root / ann_name
    with open(ann_path, "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations, "categories": cats}, f)
    return ann_path
