"""Detection training and evaluation loops (``sasa detect-train`` / ``sasa detect-eval``), one process or torchrun.

The loops take objects (model, loader, optimizer, ...); ``train`` and ``evaluate_checkpoint`` wire them from a
config dict (``load_config``: ``DEFAULTS`` <- YAML file <- command-line overrides). Reused from ``sasa.engine``:
``init_distributed`` and the reductions, atomic ``save_checkpoint`` / ``load_checkpoint``, ``MetricsLogger`` +
``plot_metrics``, ``GracefulStop``, the optimiser groups and warm-up + cosine schedule of ``optim``, the synchronised
BatchNorm of ``syncbn`` and the environment record of ``environment``.

Recipe (the paper's, SPEC section 4): SGD momentum 0.9, ``lr`` at a global batch of ``lr_batch`` scaled linearly
with the global batch, linear warm-up over ``warmup_epochs`` then cosine decay to 0 per step, weight decay 1e-4
(ours; not on norms, biases, relative embeddings), 640 crops with multiscale jitter and flips. bf16 autocast
(``amp: bf16``) runs backbone, FPN and heads in bf16 but keeps features and head outputs float32 for anchors, box
decoding and the losses (bf16 anchors would be quantised to several pixels).

Crash safety: ``last.pt`` is written atomically every ``checkpoint_every`` steps, at every epoch end and on
SIGINT/SIGTERM (the stop is agreed across ranks); resuming restores model, optimizer and the position inside the
epoch (the sampler skips the batches already seen) and drops ``metrics.jsonl`` records written after the
checkpoint. The augmentation's random draws are not replayed, so a resumed run is not bit-identical to an
uninterrupted one. Evaluation shards the images over ranks, gathers the COCO records and runs COCOeval on rank 0.

Status: complete; verified on CPU (one process and 2-process gloo) on synthetic COCO-format data, not on COCO.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.models.detection.anchor_utils import AnchorGenerator

from ..engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..engine.classify import NonFiniteLossError
from ..engine.distributed import DistInfo, all_reduce_mean, barrier, broadcast_object, init_distributed, reduce_max
from ..engine.environment import collect_environment
from ..engine.metrics import MetricsLogger, plot_metrics
from ..engine.optim import build_optimizer, scaled_lr, warmup_cosine
from ..engine.signals import GracefulStop
from ..engine.syncbn import convert_sync_batchnorm
from .coco_eval import METRICS, coco_evaluate, format_table, gather_records, to_coco_records, write_json
from .data import CocoDetection, collate, eval_transforms, train_transforms
from .draw import save_detections
from .retinanet import DETECTORS, create_detector

DEFAULTS: dict = {
    # model
    "detector": None,              # one of DETECTORS (sets backbone + heads), or None to use the two below
    "backbone": "resnet50",
    "heads": "conv",
    "num_classes": None,           # None: the dataset's number of categories
    "weights_backbone": None,      # ImageNet checkpoint of `sasa train` (.safetensors or .pt with 'model')
    "trainable_backbone_layers": None,
    "frozen_bn": None,
    "sync_bn": False,
    "fpn_channels": 256,
    "attention_kernel_size": 7,
    "attention_heads": 8,
    "predictor_kernel_size": 3,
    "backbone_overrides": None,
    "anchor_sizes": None,          # None: torchvision's (32, 64, 128, 256, 512) for P3..P7
    "anchor_scales": 3,
    "aspect_ratios": [0.5, 1.0, 2.0],
    "score_thresh": 0.05,
    "detections_per_img": 100,
    # data
    "data_dir": None,
    "train_images": "train2017",
    "train_ann": "annotations/instances_train2017.json",
    "val_images": "val2017",
    "val_ann": "annotations/instances_val2017.json",
    "skip_empty": True,            # training only (torchvision's reference recipe); evaluation keeps every image
    "image_size": 640,
    "scale_range": [0.8, 1.2],
    "hflip": 0.5,
    "workers": 4,
    # optimisation
    "epochs": 150,
    "batch_size": 64,              # global, over all ranks
    "lr": 0.12,                    # at a global batch of lr_batch; scaled linearly
    "lr_batch": 64,
    "warmup_epochs": 1.0,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "grad_clip": 0.0,              # max gradient norm, 0 for none
    "amp": "none",                 # "bf16" (CUDA) or "none"
    "seed": 0,
    "max_steps": None,             # stop early (smoke runs); the schedule still spans `epochs`
    # evaluation, logging, checkpoints
    "eval_every": 10,              # epochs; the last epoch is always evaluated
    "eval_batch_size": 8,          # per rank
    "eval_max_images": None,
    "log_every": 20,
    "checkpoint_every": 1000,      # steps
    "output": "runs/detect",
    "device": None,
    "progress": True,
}


def load_config(path: str | os.PathLike | None = None, **overrides) -> dict:
    """``DEFAULTS`` updated by a YAML file and then by the non-``None`` ``overrides``; unknown keys raise."""
    cfg = dict(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"config file {str(path)!r}: unknown key(s) {unknown}; valid: {sorted(DEFAULTS)}")
        cfg.update(data)
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown config override(s) {unknown}; valid: {sorted(DEFAULTS)}")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if cfg["detector"] is not None:
        if cfg["detector"] not in DETECTORS:
            raise ValueError(f"detector must be one of {list(DETECTORS)}, got {cfg['detector']!r}")
        cfg["backbone"], cfg["heads"] = DETECTORS[cfg["detector"]]["backbone"], DETECTORS[cfg["detector"]]["heads"]
    if cfg["amp"] not in ("none", "bf16"):
        raise ValueError(f"amp must be 'none' or 'bf16', got {cfg['amp']!r}")
    return cfg


def run_name(cfg: dict) -> str:
    return cfg["detector"] or f"retinanet_{cfg['backbone']}_{cfg['heads']}heads"


# ---------------------------------------------------------------------------------------------------- building


def build_detector(cfg: dict, num_classes: int) -> nn.Module:
    """``create_detector`` from a config."""
    kwargs = {"min_size": cfg["image_size"], "max_size": cfg["image_size"], "score_thresh": cfg["score_thresh"],
              "detections_per_img": cfg["detections_per_img"]}
    if cfg["anchor_sizes"] is not None:
        n = int(cfg["anchor_scales"])
        sizes = tuple(tuple(int(s * 2 ** (i / n)) for i in range(n)) for s in cfg["anchor_sizes"])
        kwargs["anchor_generator"] = AnchorGenerator(sizes, (tuple(cfg["aspect_ratios"]),) * len(sizes))
    return create_detector(cfg["backbone"], cfg["heads"], num_classes, weights_backbone=cfg["weights_backbone"],
                           trainable_backbone_layers=cfg["trainable_backbone_layers"], frozen_bn=cfg["frozen_bn"],
                           fpn_channels=cfg["fpn_channels"], attention_kernel_size=cfg["attention_kernel_size"],
                           attention_heads=cfg["attention_heads"], predictor_kernel_size=cfg["predictor_kernel_size"],
                           backbone_overrides=cfg["backbone_overrides"], **kwargs)


def _data_paths(cfg: dict, split: str) -> tuple[Path, Path]:
    if not cfg["data_dir"]:
        raise ValueError("data_dir is not set: pass --data-dir (a folder with the images folders and the "
                         "annotations JSON files) or set data_dir in the config")
    root = Path(cfg["data_dir"])
    return root / cfg[f"{split}_images"], root / cfg[f"{split}_ann"]


def build_dataset(cfg: dict, split: str, *, warn: bool = True) -> CocoDetection:
    """The ``train`` (augmented, ``skip_empty``) or ``val`` dataset of a config."""
    images, ann = _data_paths(cfg, split)
    if split == "train":
        tf = train_transforms(cfg["image_size"], tuple(cfg["scale_range"]), cfg["hflip"])
        return CocoDetection(images, ann, transforms=tf, skip_empty=cfg["skip_empty"], warn=warn)
    return CocoDetection(images, ann, transforms=eval_transforms(), warn=warn)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch after its first ``skip`` indices (mid-epoch resume)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return super().__len__() - self.skip


def _float32_outputs(module, inputs, output):
    """Forward hook: float32 outputs (features / head outputs leave bf16 autocast regions as float32)."""
    return {k: v.float() for k, v in output.items()}


def enable_bf16_(model: nn.Module) -> None:
    """Keep a RetinaNet's features and head outputs float32 under autocast (see the module docstring)."""
    model.backbone.register_forward_hook(_float32_outputs)
    model.head.register_forward_hook(_float32_outputs)


def _autocast(device: torch.device, amp: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def _to_device(images, targets, device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{"boxes": t["boxes"].to(device, non_blocking=True), "labels": t["labels"].to(device)}
               for t in targets]
    return images, targets


# ---------------------------------------------------------------------------------------------------- loops


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, *, dist: DistInfo,
                    epoch: int, position: dict, schedule, steps_per_epoch: int, logger: MetricsLogger,
                    stop: GracefulStop, save, cfg: dict) -> str:
    """One epoch from ``position['step_in_epoch']``; returns ``"done"``, ``"stopped"`` or ``"max_steps"``.

    Args:
        model: the (possibly DDP-wrapped) detector in training mode.
        loader: batches of ``(images, targets)``.
        optimizer: its learning rate is set every step from ``schedule(global_step)``.
        dist: this process's ``DistInfo``.
        epoch: 0-based epoch.
        position: ``{"epoch", "step_in_epoch", "global_step"}``, advanced in place.
        schedule: ``global_step -> lr``.
        steps_per_epoch: optimizer steps in a full epoch.
        logger: ``metrics.jsonl`` writer.
        stop: polled every step; a stop is agreed across ranks.
        save: ``save()`` writes ``last.pt`` (rank 0 only).
        cfg: ``log_every``, ``checkpoint_every``, ``grad_clip``, ``amp``, ``max_steps``, ``progress``.
    """
    from tqdm import tqdm

    model.train()
    device = dist.device
    window = torch.zeros(3, device=device)  # loss, classification, bbox_regression summed over the log window
    seen, t_window = 0, time.perf_counter()
    bar = tqdm(loader, total=steps_per_epoch, initial=position["step_in_epoch"], desc=f"epoch {epoch + 1}",
               disable=not (dist.is_main and cfg["progress"]), dynamic_ncols=True, leave=False)
    for images, targets in bar:
        images, targets = _to_device(images, targets, device)
        lr = schedule(position["global_step"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        with _autocast(device, cfg["amp"]):
            losses = model(images, targets)
        loss = losses["classification"] + losses["bbox_regression"]
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"non-finite loss {loss.item()} at epoch {epoch + 1}, step "
                                     f"{position['global_step']} (lr {lr:.4g}); lower lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg["grad_clip"]:
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg["grad_clip"])
        optimizer.step()
        position["step_in_epoch"] += 1
        position["global_step"] += 1
        window += torch.stack([loss.detach(), losses["classification"].detach(), losses["bbox_regression"].detach()])
        seen += 1
        step = position["global_step"]
        if step % cfg["log_every"] == 0 or position["step_in_epoch"] == steps_per_epoch:
            mean = (all_reduce_mean(window) / seen).tolist()
            dt = (time.perf_counter() - t_window) / seen
            record = {"kind": "step", "epoch": epoch + position["step_in_epoch"] / steps_per_epoch, "step": step,
                      "lr": lr, "loss": mean[0], "loss_cls": mean[1], "loss_box": mean[2], "step_time_s": dt,
                      "img_per_s": cfg["batch_size"] / dt}
            logger.log(record)
            bar.set_postfix(loss=f"{mean[0]:.3f}", lr=f"{lr:.3g}")
            window.zero_()
            seen, t_window = 0, time.perf_counter()
        stopping = bool(reduce_max(torch.tensor(float(stop.requested), device=device)).item())
        if stopping or (cfg["checkpoint_every"] and step % cfg["checkpoint_every"] == 0):
            save()
        if stopping:
            return "stopped"
        if cfg["max_steps"] is not None and step >= cfg["max_steps"]:
            return "max_steps"
    bar.close()
    return "done"


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, dataset: CocoDetection, *, dist: DistInfo, amp: str = "none",
             draw: int = 0, draw_dir: str | os.PathLike | None = None, progress: bool = True
             ) -> tuple[dict[str, float], list[dict]]:
    """COCO metrics (percent) of ``model`` on ``loader``'s images, and the gathered result records.

    Args:
        model: the detector (unwrapped).
        loader: this rank's shard of ``dataset``.
        dataset: the ``CocoDetection`` (ground truth and category ids).
        dist: this process's ``DistInfo``; rank 0 runs COCOeval, every rank gets the metrics.
        amp: ``"bf16"`` or ``"none"``.
        draw: draw the first ``draw`` images of rank 0's shard into ``draw_dir`` as PNG.
        draw_dir: folder for the drawings.
        progress: show a progress bar on rank 0.
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    records, ids, drawn = [], [], 0
    for images, targets in tqdm(loader, desc="eval", disable=not (dist.is_main and progress), dynamic_ncols=True,
                                leave=False):
        with _autocast(dist.device, amp):
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


def _eval_loader(dataset: CocoDetection, dist: DistInfo, cfg: dict) -> DataLoader:
    n = len(dataset) if cfg["eval_max_images"] is None else min(len(dataset), int(cfg["eval_max_images"]))
    shard = Subset(dataset, range(dist.rank, n, dist.world_size))
    return DataLoader(shard, batch_size=cfg["eval_batch_size"], shuffle=False, num_workers=cfg["workers"],
                      collate_fn=collate, pin_memory=dist.device.type == "cuda")


def _paper_row(cfg: dict, num_classes: int) -> tuple | None:
    if cfg["detector"] in DETECTORS and num_classes == 80:
        return DETECTORS[cfg["detector"]]["paper"][2:]
    return None


# ---------------------------------------------------------------------------------------------------- wiring


def train(cfg: dict, *, resume: str | None = None) -> dict:
    """``sasa detect-train``: build everything from ``cfg``, train, evaluate.

    Returns:
        ``{"status": "done" | "max_steps" | "stopped", "metrics": final COCO metrics or None, "signum": int | None,
        "step": global step, "run_dir": path}``.
    """
    dist = init_distributed(cfg["device"])
    torch.manual_seed(cfg["seed"] + dist.rank)
    run_dir = Path(cfg["output"])
    train_set = build_dataset(cfg, "train", warn=dist.is_main)
    val_set = build_dataset(cfg, "val", warn=dist.is_main)
    if train_set.cat_ids != val_set.cat_ids:
        raise ValueError(f"train and val annotation files have different categories: {train_set.cat_ids} vs "
                         f"{val_set.cat_ids}")
    num_classes = cfg["num_classes"] or train_set.num_classes
    if num_classes < train_set.num_classes:
        raise ValueError(f"num_classes={num_classes} is smaller than the dataset's {train_set.num_classes} "
                         f"categories ({cfg['train_ann']})")
    if cfg["batch_size"] % dist.world_size:
        raise ValueError(f"batch_size={cfg['batch_size']} (global) must be divisible by the world size "
                         f"{dist.world_size}")
    per_rank = cfg["batch_size"] // dist.world_size

    model = build_detector(cfg, num_classes).to(dist.device)
    if cfg["sync_bn"] and dist.distributed:
        model = convert_sync_batchnorm(model, dist.device)
    if cfg["amp"] == "bf16":
        enable_bf16_(model)
    base_lr = scaled_lr(cfg["lr"], cfg["batch_size"], cfg["lr_batch"])
    optimizer = build_optimizer(model, name="sgd", lr=base_lr, weight_decay=cfg["weight_decay"],
                                momentum=cfg["momentum"], nesterov=False)
    sampler = ResumableSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                               seed=cfg["seed"], drop_last=True)
    loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler, num_workers=cfg["workers"],
                        collate_fn=collate, drop_last=True, pin_memory=dist.device.type == "cuda",
                        persistent_workers=False)
    steps_per_epoch = len(sampler) // per_rank
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images give no full batch of {cfg['batch_size']}")
    total_steps = steps_per_epoch * cfg["epochs"]
    warmup = max(1, round(cfg["warmup_epochs"] * steps_per_epoch))

    def schedule(step: int) -> float:
        return base_lr * warmup_cosine(step, total_steps=total_steps, warmup_steps=warmup)

    meta = {"backbone": cfg["backbone"], "heads": cfg["heads"], "num_classes": num_classes,
            "cat_ids": train_set.cat_ids, "cat_names": train_set.cat_names}
    position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    logger = MetricsLogger(run_dir, enabled=dist.is_main)
    if resume:
        path = run_dir / "last.pt" if resume == "auto" else Path(resume)
        path = path / "last.pt" if path.is_dir() else path
        if resume != "auto" or path.is_file():
            state = load_checkpoint(path, map_location="cpu")
            old = state.get("meta", {})
            for key in ("backbone", "heads", "num_classes"):
                if old.get(key) != meta[key]:
                    raise CheckpointError(f"checkpoint {str(path)!r} was written for {key}={old.get(key)!r}, "
                                          f"this run has {key}={meta[key]!r}")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            position = dict(state["position"])
            if position["step_in_epoch"] >= steps_per_epoch:
                position = {"epoch": position["epoch"] + 1, "step_in_epoch": 0,
                            "global_step": position["global_step"]}
            logger.truncate(lambda r: r.get("step", 0) <= position["global_step"])
            if dist.is_main:
                print(f"resumed from {path}: epoch {position['epoch'] + 1}, step {position['global_step']}")
    ddp = model
    if dist.distributed:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[dist.device.index]
                                                  if dist.device.type == "cuda" else None)

    def save() -> None:
        if dist.is_main:
            save_checkpoint(run_dir / "last.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                  "position": dict(position), "meta": meta, "config": cfg})
        barrier()

    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "config.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        print(f"{run_name(cfg)}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
              f"{len(train_set)} train / {len(val_set)} val images, {num_classes} classes, global batch "
              f"{cfg['batch_size']} = {dist.world_size} x {per_rank}, lr {base_lr:.4g}, {steps_per_epoch} steps/epoch, "
              f"warm-up {warmup} steps, {total_steps} steps in all -> {run_dir}")

    val_loader = _eval_loader(val_set, dist, cfg)
    metrics, status = None, "done"
    with GracefulStop() as stop:
        while position["epoch"] < cfg["epochs"]:
            epoch = position["epoch"]
            sampler.set_epoch(epoch)
            sampler.skip = position["step_in_epoch"] * per_rank
            status = train_one_epoch(ddp, loader, optimizer, dist=dist, epoch=epoch, position=position,
                                     schedule=schedule, steps_per_epoch=steps_per_epoch, logger=logger, stop=stop,
                                     save=save, cfg=cfg)
            if status == "stopped":
                if dist.is_main:
                    print(f"stopped by {stop.signal_name or 'request'} at step {position['global_step']}; "
                          f"resume with --resume {run_dir / 'last.pt'}")
                return {"status": status, "metrics": None, "signum": stop.signum, "step": position["global_step"],
                        "run_dir": str(run_dir)}
            last = status == "max_steps" or epoch + 1 == cfg["epochs"]
            if status == "done":
                position.update(epoch=epoch + 1, step_in_epoch=0)
            save()
            if last or (cfg["eval_every"] and (epoch + 1) % cfg["eval_every"] == 0):
                metrics, _ = evaluate(model, val_loader, val_set, dist=dist, amp=cfg["amp"],
                                      progress=cfg["progress"])
                logger.log({"kind": "epoch", "epoch": position["epoch"] if status == "done" else
                            epoch + position["step_in_epoch"] / steps_per_epoch, "step": position["global_step"],
                            **metrics})
                if dist.is_main:
                    print(f"epoch {epoch + 1}/{cfg['epochs']} COCO val\n"
                          + format_table(metrics, paper=_paper_row(cfg, num_classes)))
            if last:
                break
    if dist.is_main:
        write_json(run_dir / "coco_eval.json", {"metrics": metrics, "detector": run_name(cfg), **meta,
                                                "step": position["global_step"],
                                                "environment": collect_environment(dist.device, dist.world_size)})
        plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png", title=run_name(cfg))
    return {"status": status, "metrics": metrics, "signum": None, "step": position["global_step"],
            "run_dir": str(run_dir)}


RUNTIME_KEYS = ("device", "workers", "progress", "output", "max_steps", "amp", "eval_batch_size", "eval_max_images")


def evaluate_checkpoint(checkpoint: str | os.PathLike, *, config_file: str | os.PathLike | None = None,
                        overrides: dict | None = None, draw: int = 0) -> dict:
    """``sasa detect-eval``: rebuild the detector a checkpoint was trained as, evaluate, draw; returns metrics.

    Settings: ``DEFAULTS`` < ``config_file`` < the checkpoint's own config (all but ``RUNTIME_KEYS``) <
    ``overrides`` (data and runtime keys, e.g. ``data_dir``, ``val_ann``, ``device``, ``image_size``).
    """
    state = load_checkpoint(checkpoint, map_location="cpu")
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} has no 'model' state dict (keys: {sorted(state)})")
    meta = state.get("meta", {})
    cfg = load_config(config_file)
    cfg.update({k: v for k, v in (state.get("config") or {}).items() if k in DEFAULTS and k not in RUNTIME_KEYS})
    cfg = load_config(None, **{**cfg, **(overrides or {})})
    dist = init_distributed(cfg["device"])
    cfg["weights_backbone"] = None  # the checkpoint holds every weight
    val_set = build_dataset(cfg, "val", warn=dist.is_main)
    num_classes = meta.get("num_classes") or cfg["num_classes"] or val_set.num_classes
    if meta.get("cat_ids") not in (None, val_set.cat_ids):
        raise ValueError(f"checkpoint {str(checkpoint)!r} was trained on category ids {meta['cat_ids']}, but "
                         f"{cfg['val_ann']} has {val_set.cat_ids}")
    model = build_detector(cfg, num_classes)
    model.load_state_dict(state["model"])
    model.to(dist.device)
    if cfg["amp"] == "bf16":
        enable_bf16_(model)
    out = Path(cfg["output"])
    metrics, records = evaluate(model, _eval_loader(val_set, dist, cfg), val_set, dist=dist, amp=cfg["amp"],
                                draw=draw, draw_dir=out / "drawings", progress=cfg["progress"])
    if dist.is_main:
        write_json(out / "coco_eval.json", {"metrics": metrics, "checkpoint": str(checkpoint),
                                            "detector": run_name(cfg), "images": cfg["val_images"],
                                            "annotations": cfg["val_ann"],
                                            "environment": collect_environment(dist.device, dist.world_size)})
        write_json(out / "detections.json", records)  # COCO results format
        print(format_table(metrics, paper=_paper_row(cfg, num_classes)))
        print(f"wrote {out / 'coco_eval.json'}" + (f" and {min(draw, len(val_set))} drawings in "
                                                   f"{out / 'drawings'}" if draw else ""))
    return metrics


__all__ = ["DEFAULTS", "METRICS", "build_dataset", "build_detector", "evaluate", "evaluate_checkpoint",
           "load_config", "train", "train_one_epoch"]
