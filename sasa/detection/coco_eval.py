"""COCO box evaluation with pycocotools' ``COCOeval``: each rank's detections -> COCO result records (xywh in
original pixels, the dataset's category ids) -> ``gather_records`` -> mAP, AP50, AP75, APs/m/l on the main rank, in
percent as the paper reports them, lower-case keys (``map``, ``map50``, ...) that ``plot_metrics`` draws.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from ..io.atomic import atomic_write_text

# COCOeval.stats indices 0..5, the paper's columns and the size breakdown
METRICS = ("map", "map50", "map75", "map_small", "map_medium", "map_large")
LABELS = {"map": "mAP", "map50": "AP50", "map75": "AP75", "map_small": "APs", "map_medium": "APm",
          "map_large": "APl"}


def to_coco_records(detections: Sequence[dict], image_ids: Sequence[int], cat_ids: Sequence[int]) -> list[dict]:
    """COCO result records from RetinaNet outputs: one dict per image with ``boxes`` (N, 4) xyxy, ``scores``
    (N,), ``labels`` (N,) contiguous (``cat_ids[label]`` is the dataset's category id), and its COCO image id."""
    if len(detections) != len(image_ids):
        raise ValueError(f"got {len(detections)} detections for {len(image_ids)} image ids")
    records = []
    for det, img_id in zip(detections, image_ids):
        boxes = det["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, score, label in zip(xywh, det["scores"].tolist(), det["labels"].tolist()):
            records.append({"image_id": int(img_id), "category_id": int(cat_ids[label]),
                            "bbox": [round(v, 2) for v in box], "score": round(float(score), 5)})
    return records


def gather_records(records: list, image_ids: list[int]) -> tuple[list, list[int]]:
    """All ranks' records and evaluated image ids (no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return records, image_ids
    boxes: list = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, (records, image_ids))
    return [r for recs, _ in boxes for r in recs], sorted({i for _, ids in boxes for i in ids})


def coco_evaluate(coco_gt, records: list[dict], image_ids: Sequence[int] | None = None, *,
                  verbose: bool = False) -> dict[str, float]:
    """``METRICS`` in percent of ``COCOeval`` (bbox) on ``records`` (``to_coco_records``) against ``coco_gt``, over
    ``image_ids`` (``None``: all of ``coco_gt``'s); ``verbose`` prints COCOeval's own summary."""
    from pycocotools.cocoeval import COCOeval

    if not records:  # loadRes cannot take an empty list; no detection means AP 0 everywhere
        return dict.fromkeys(METRICS, 0.0)
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        coco_dt = coco_gt.loadRes(records)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted({int(i) for i in image_ids})
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval reports -1 where a size range has no ground truth: keep it as "not available"
    return {k: (float(v) * 100 if v >= 0 else float("nan")) for k, v in zip(METRICS, evaluator.stats[:6])}


def format_table(metrics: dict[str, float], *, paper: tuple[float, float, float] | None = None) -> str:
    """The metrics as a one-row table (percent), with the paper's mAP/AP50/AP75 row when given."""
    header = " ".join(f"{LABELS[k]:>6}" for k in METRICS)
    row = " ".join(f"{metrics.get(k, float('nan')):>6.1f}" for k in METRICS)
    lines = [f"{'':<6} {header}", f"{'ours':<6} {row}"]
    if paper is not None:
        lines.append(f"{'paper':<6} " + " ".join(f"{v:>6.1f}" for v in paper))
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict | list) -> None:
    """Write ``payload`` as indented JSON, atomically (NaN and inf written as null)."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return None if isinstance(v, float) and not math.isfinite(v) else v

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(clean(payload), indent=2) + "\n")
