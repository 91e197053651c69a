"""Detection as a task of the shared ``Trainer``: a step is RetinaNet's loss dict on ``(images, targets)``; an
evaluation is COCOeval on the validation images, sharded over ranks (``ShardSampler``), gathered and scored on
rank 0, its metrics broadcast to every rank. bf16 autocast runs backbone, FPN and heads in bf16 but keeps features
and head outputs float32 for anchors, box decoding and the losses (``enable_bf16_``: bf16 anchors would be
quantised to several pixels).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..data import ShardSampler
from ..engine.distributed import DistInfo, broadcast_object
from ..engine.trainer import StepResult, autocast
from .coco_eval import METRICS, coco_evaluate, gather_records, to_coco_records
from .data import CocoDetection, collate
from .draw import save_detections


def _float32_outputs(module, inputs, output):
    """Forward hook: float32 outputs (features / head outputs leave bf16 autocast regions as float32)."""
    return {k: v.float() for k, v in output.items()}


def enable_bf16_(model: nn.Module) -> None:
    """Keep a RetinaNet's features and head outputs float32 under autocast (see the module docstring)."""
    model.backbone.register_forward_hook(_float32_outputs)
    model.head.register_forward_hook(_float32_outputs)


def eval_loader(dataset: CocoDetection, dist: DistInfo, *, batch_size: int, workers: int,
                max_images: int | None = None) -> DataLoader:
    """This rank's shard of the first ``max_images`` images (all when ``None``), in order, without padding."""
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    return DataLoader(Subset(dataset, range(n)), batch_size=batch_size, num_workers=workers, collate_fn=collate,
                      sampler=ShardSampler(n, num_replicas=dist.world_size, rank=dist.rank),
                      pin_memory=dist.device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, dataset: CocoDetection, *, dist: DistInfo,
             amp_dtype: torch.dtype | None = None, draw: int = 0, draw_dir: str | os.PathLike | None = None,
             progress: bool = True) -> tuple[dict[str, float], list[dict]]:
    """COCO metrics (percent) of ``model`` on ``loader`` (this rank's ``eval_loader`` shard of ``dataset``) on every
    rank, and the gathered result records; ``draw`` > 0 draws the first images of rank 0's shard into ``draw_dir``."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    records, ids, drawn = [], [], 0
    for images, targets in tqdm(loader, desc="eval", disable=not (dist.is_main and progress), dynamic_ncols=True,
                                leave=False):
        with autocast(dist.device, amp_dtype):
            outputs = model([img.to(dist.device, non_blocking=True) for img in images])
        img_ids = [t["image_id"] for t in targets]
        records += to_coco_records(outputs, img_ids, dataset.cat_ids)
        ids += img_ids
        for i in range(len(images) if dist.is_main and draw_dir is not None else 0):
            if drawn >= draw:
                break
            save_detections(Path(draw_dir) / f"{img_ids[i]:012d}.png", images[i], outputs[i], dataset.cat_names,
                            gt_boxes=targets[i]["boxes"])
            drawn += 1
    model.train(was_training)
    records, ids = gather_records(records, ids)
    metrics = coco_evaluate(dataset.coco, records, ids) if dist.is_main else None
    return broadcast_object(metrics), records


class DetectionTask:
    """RetinaNet training (classification + box-regression loss) and COCOeval on ``val_set`` through
    ``val_loader`` (its ``eval_loader``); ``amp_dtype`` is the evaluation's autocast (the trainer's own wraps the
    training step)."""

    sums = ("loss", "loss_cls", "loss_box")
    score = "map"

    def __init__(self, *, val_loader: DataLoader, val_set: CocoDetection, dist: DistInfo,
                 amp_dtype: torch.dtype | None = None) -> None:
        self.val_loader, self.val_set, self.dist, self.amp_dtype = val_loader, val_set, dist, amp_dtype

    def step(self, model: nn.Module, batch) -> StepResult:
        device = self.dist.device
        images = [img.to(device, non_blocking=True) for img in batch[0]]
        targets = [{"boxes": t["boxes"].to(device, non_blocking=True), "labels": t["labels"].to(device)}
                   for t in batch[1]]
        losses = model(images, targets)
        loss = losses["classification"] + losses["bbox_regression"]
        parts = torch.stack([loss, losses["classification"], losses["bbox_regression"]]).detach().double()
        return StepResult(loss, parts * len(images), len(images), [])

    def summarize(self, sums: dict, count: float) -> dict:
        return {k: sums.get(k, 0.0) / count for k in self.sums}

    def evaluate(self, module: nn.Module, ema_module: nn.Module | None = None, *, show_progress: bool = False) -> dict:
        """COCO metrics (``map``, ``map50``, ...; and ``map_ema``, ... for the EMA weights)."""
        kw = {"dist": self.dist, "amp_dtype": self.amp_dtype, "progress": show_progress}
        record = evaluate(module, self.val_loader, self.val_set, **kw)[0]
        if ema_module is not None:
            ema = evaluate(ema_module, self.val_loader, self.val_set, **kw)[0]
            record.update({f"{k}_ema": v for k, v in ema.items()})
        return record

    @staticmethod
    def format_epoch(record: dict, epochs: int) -> str:
        parts = [f"epoch {record['epoch']}/{epochs}", f"train loss {record['train_loss']:.4f} (cls "
                 f"{record['train_loss_cls']:.4f}, box {record['train_loss_box']:.4f})"]
        if "map" in record:
            parts += [f"val mAP {record['map']:.2f}", f"AP50 {record['map50']:.2f}", f"AP75 {record['map75']:.2f}"]
        if "map_ema" in record:
            parts.append(f"ema mAP {record['map_ema']:.2f}")
        return " | ".join(parts)


__all__ = ["METRICS", "DetectionTask", "enable_bf16_", "eval_loader", "evaluate"]
