"""``sasa detect-train`` and ``sasa detect-eval``: a validated ``DetectConfig`` in, the detector, COCO data and
optimiser built and handed to the shared ``Trainer`` with a ``DetectionTask``, the same run directory, resume and
exit codes as ``sasa train`` out (``summary.json`` holds the final COCO metrics). The augmentation's random draws
are not replayed, so a resumed run is not bit-identical to an uninterrupted one."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models.detection.anchor_utils import AnchorGenerator

from ..engine import config as C
from ..engine import rundir
from ..engine.distributed import barrier, cleanup, init_distributed, parallelize
from ..engine.environment import collect_environment
from ..engine.metrics import plot_metrics
from ..engine.rundir import say
from ..engine.signals import GracefulStop
from ..engine.trainer import NonFiniteLossError, Trainer, amp_dtype
from ..io.checkpoint import CheckpointError, load_checkpoint
from ..process import configure_process
from .coco_eval import METRICS, format_table, write_json
from .config import DetectConfig, run_name
from .data import CocoDetection, collate, eval_transforms, train_transforms
from .retinanet import DETECTORS, create_detector
from .task import DetectionTask, enable_bf16_, eval_loader, evaluate

COMMAND = "sasa detect-train"


def build_detector(cfg: DetectConfig, num_classes: int) -> nn.Module:
    """``create_detector`` from a config."""
    kwargs = {"min_size": cfg.image_size, "max_size": cfg.image_size, "score_thresh": cfg.score_thresh,
              "detections_per_img": cfg.detections_per_img}
    if cfg.anchor_sizes is not None:
        n = cfg.anchor_scales
        sizes = tuple(tuple(int(s * 2 ** (i / n)) for i in range(n)) for s in cfg.anchor_sizes)
        kwargs["anchor_generator"] = AnchorGenerator(sizes, (tuple(cfg.aspect_ratios),) * len(sizes))
    return create_detector(cfg.backbone, cfg.heads, num_classes, weights_backbone=cfg.weights_backbone,
                           trainable_backbone_layers=cfg.trainable_backbone_layers, frozen_bn=cfg.frozen_bn,
                           fpn_channels=cfg.fpn_channels, attention_kernel_size=cfg.attention_kernel_size,
                           attention_heads=cfg.attention_heads, predictor_kernel_size=cfg.predictor_kernel_size,
                           backbone_overrides=cfg.backbone_args or None, **kwargs)


def build_dataset(cfg: DetectConfig, split: str, *, warn: bool = True) -> CocoDetection:
    """The ``train`` (augmented, ``skip_empty``) or ``val`` dataset of a config."""
    if not cfg.data_dir:
        raise C.ConfigError("data_dir is not set: pass --data-dir (a folder with the images folders and the "
                            "annotations JSON files) or set data_dir in the config")
    root = Path(cfg.data_dir)
    images, ann = root / getattr(cfg, f"{split}_images"), root / getattr(cfg, f"{split}_ann")
    if split == "train":
        tf = train_transforms(cfg.image_size, tuple(cfg.scale_range), cfg.hflip)
        return CocoDetection(images, ann, transforms=tf, skip_empty=cfg.skip_empty, warn=warn)
    return CocoDetection(images, ann, transforms=eval_transforms(), warn=warn)


def _paper_row(cfg: DetectConfig, num_classes: int) -> tuple | None:
    return DETECTORS[cfg.detector]["paper"][2:] if cfg.detector in DETECTORS and num_classes == 80 else None


def _check(cfg: DetectConfig, num_classes: int | None = None) -> Callable[[dict, str], None]:
    """``check(meta, source)``: raise when a checkpoint was written for another detector."""
    def check(meta: dict, source: str) -> None:
        for key, value in (("backbone", cfg.backbone), ("heads", cfg.heads), ("num_classes", num_classes)):
            if value is not None and meta.get(key) not in (None, value):
                raise CheckpointError(f"checkpoint {source!r} was written for {key}={meta[key]!r}, this run has "
                                      f"{key}={value!r}")
    return check


def _complete(summary: dict) -> bool:
    value = (summary.get("metrics") or {}).get("map")
    return isinstance(value, (int, float)) and math.isfinite(value)


def config_for_resume(resume: str | os.PathLike, overrides: dict) -> DetectConfig:
    """The config saved in the run directory ``resume`` names, with the keys a resumed run may change."""
    return rundir.config_for_resume(resume, overrides, schema=DetectConfig, command=COMMAND)


def train(cfg: DetectConfig) -> int:
    """``sasa detect-train``: run (or resume) the run ``cfg`` describes; returns the process exit code (0 done or
    ``max_steps`` reached, 1 non-finite loss, 128 + signal number when stopped)."""
    if cfg.resume and (summary := rundir.finished_summary(cfg, check=_check(cfg), complete=_complete,
                                                          command=COMMAND)) is not None:
        rundir.say_finished(rundir.resume_paths(cfg.resume)[0], summary, f"mAP {summary['metrics']['map']:.2f}",
                            COMMAND)
        return 0
    dist = init_distributed(cfg.device)
    configure_process(dist.device, threads=cfg.threads)
    try:
        return _train(cfg, dist)
    finally:
        cleanup()


def _train(cfg: DetectConfig, dist) -> int:
    from ..data import ResumableDistributedSampler
    from ..engine.ema import build_ema
    from ..engine.optim import optimization_for
    from ..engine.syncbn import convert_sync_batchnorm

    train_set = build_dataset(cfg, "train", warn=dist.is_main)
    val_set = build_dataset(cfg, "val", warn=dist.is_main)
    if train_set.cat_ids != val_set.cat_ids:
        raise ValueError(f"train and val annotation files have different categories: {train_set.cat_ids} vs "
                         f"{val_set.cat_ids}")
    num_classes = cfg.num_classes or train_set.num_classes
    if num_classes < train_set.num_classes:
        raise ValueError(f"num_classes={num_classes} is smaller than the dataset's {train_set.num_classes} "
                         f"categories ({cfg.train_ann})")
    if cfg.batch_size % dist.world_size:
        raise C.ConfigError(f"config key 'batch_size' ({cfg.batch_size}) must be divisible by the number of "
                            f"processes ({dist.world_size})")
    per_rank, device, name = cfg.batch_size // dist.world_size, dist.device, run_name(cfg)
    meta = {"backbone": cfg.backbone, "heads": cfg.heads, "num_classes": num_classes,
            "cat_ids": train_set.cat_ids, "cat_names": train_set.cat_names}
    run = rundir.RunDirectory(cfg, dist, default_name=f"runs/detect/{name}", command=COMMAND, meta=meta)

    torch.manual_seed(cfg.seed)
    module = build_detector(cfg, num_classes).to(device)
    if cfg.sync_bn and dist.distributed:
        module = convert_sync_batchnorm(module, device)
    amp = amp_dtype(cfg.amp, device)
    if amp is not None:
        enable_bf16_(module)
    ema = build_ema(module, cfg.ema_decay) if cfg.ema_decay > 0 else None
    model = parallelize(module, dist, compile=cfg.compile)
    sampler = ResumableDistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                          seed=cfg.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler, num_workers=cfg.workers, collate_fn=collate,
                        drop_last=True, pin_memory=device.type == "cuda", persistent_workers=False)
    val_loader = eval_loader(val_set, dist, batch_size=cfg.eval_batch_size, workers=cfg.workers,
                             max_images=cfg.eval_max_images)
    steps_per_epoch = sampler.num_samples // per_rank
    lr, optimizer, scheduler = optimization_for(cfg, module, steps_per_epoch)

    with GracefulStop() as stop:
        task = DetectionTask(val_loader=val_loader, val_set=val_set, dist=dist, amp_dtype=amp)
        trainer = Trainer(task=task, model=model, module=module, optimizer=optimizer, scheduler=scheduler,
                          train_loader=loader, dist=dist, epochs=cfg.epochs, ema=ema, amp_dtype=amp,
                          grad_clip=cfg.grad_clip, logger=run.logger, log_every=cfg.log_every,
                          checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every, max_steps=cfg.max_steps,
                          save=run.save, stop=stop, quiet=cfg.quiet)
        env = collect_environment(device, dist.world_size)
        env.update(steps_per_epoch=steps_per_epoch, local_batch=per_rank, lr=lr)
        run.start(trainer, env, check=_check(cfg, num_classes))
        say(dist, f"{COMMAND}: {name}: {sum(p.numel() for p in module.parameters()) / 1e6:.2f}M params, "
                  f"{len(train_set)} train / {len(val_set)} val images, {num_classes} classes, global batch "
                  f"{cfg.batch_size} = {dist.world_size} x {per_rank}, lr {lr:.4g}, {steps_per_epoch} steps/epoch, "
                  f"warm-up {round(cfg.warmup_epochs * steps_per_epoch)} steps, {steps_per_epoch * cfg.epochs} "
                  f"steps in all -> {run.path}")
        try:
            status = trainer.fit()
        except NonFiniteLossError as err:
            say(dist, f"{COMMAND}: error: {err}")
            return 1
    if status == "stopped":
        return run.stopped(stop)

    final = trainer.last_eval if "map" in trainer.last_eval else trainer.validate()
    p = trainer.progress
    if "map" not in trainer.last_eval:  # max_steps, or resumed after the last epoch but before this evaluation
        run.logger.log({"kind": "eval", "epoch": p.epoch + p.batches_done / trainer.steps_per_epoch,
                        "step": p.global_step, **{k: final[k] for k in METRICS}})
    if dist.is_main:
        metrics = {k: final[k] for k in METRICS}
        write_json(run.path / "summary.json", {
            "detector": name, **meta, "status": status, "epochs": p.epoch, "step": p.global_step, "metrics": metrics,
            **({"metrics_ema": {k: final[f"{k}_ema"] for k in METRICS}} if ema is not None else {}),
            "environment": collect_environment(device, dist.world_size)})
        plot_metrics(run.path / "metrics.jsonl", run.path / "metrics.png", title=name)
        say(dist, f"{name} after {p.global_step} steps, COCO val\n"
                  + format_table(metrics, paper=_paper_row(cfg, num_classes)))
    barrier()
    return 0


RUNTIME_KEYS = ("device", "workers", "threads", "quiet", "output", "resume", "max_steps", "amp", "eval_batch_size",
                "eval_max_images")


def evaluate_checkpoint(checkpoint: str | os.PathLike, *, config_file: str | os.PathLike | None = None,
                        overrides: dict | None = None, draw: int = 0) -> dict:
    """``sasa detect-eval``: rebuild the detector a checkpoint was trained as, evaluate, draw; returns metrics.

    Settings: ``DetectConfig`` defaults < ``config_file`` < the checkpoint's own config (all but ``RUNTIME_KEYS``) <
    ``overrides`` (data and runtime keys, e.g. ``data_dir``, ``val_ann``, ``device``, ``image_size``).
    """
    state = load_checkpoint(checkpoint, map_location="cpu")
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} has no 'model' state dict (keys: {sorted(state)})")
    meta = state.get("meta", {})
    fields = C.fields_of(DetectConfig)
    trained = {k: v for k, v in (state.get("config") or {}).items() if k in fields and k not in RUNTIME_KEYS}
    cfg = C.resolve(config_file, {**trained, **(overrides or {})}, schema=DetectConfig)
    cfg.weights_backbone = None  # the checkpoint holds every weight
    dist = init_distributed(cfg.device)
    configure_process(dist.device, threads=cfg.threads)
    val_set = build_dataset(cfg, "val", warn=dist.is_main)
    num_classes = meta.get("num_classes") or cfg.num_classes or val_set.num_classes
    if meta.get("cat_ids") not in (None, val_set.cat_ids):
        raise ValueError(f"checkpoint {str(checkpoint)!r} was trained on category ids {meta['cat_ids']}, but "
                         f"{cfg.val_ann} has {val_set.cat_ids}")
    model = build_detector(cfg, num_classes)
    model.load_state_dict(state["model"])
    model.to(dist.device)
    amp = amp_dtype(cfg.amp, dist.device)
    if amp is not None:
        enable_bf16_(model)
    out = Path(cfg.output or Path(checkpoint).parent / "eval")
    loader = eval_loader(val_set, dist, batch_size=cfg.eval_batch_size, workers=cfg.workers,
                         max_images=cfg.eval_max_images)
    metrics, records = evaluate(model, loader, val_set, dist=dist, amp_dtype=amp, draw=draw, draw_dir=out / "drawings",
                                progress=not cfg.quiet)
    if dist.is_main:
        write_json(out / "coco_eval.json", {
            "metrics": metrics, "checkpoint": str(checkpoint), "detector": run_name(cfg), "images": cfg.val_images,
            "annotations": cfg.val_ann, "environment": collect_environment(dist.device, dist.world_size)})
        write_json(out / "detections.json", records)  # COCO results format
        print(format_table(metrics, paper=_paper_row(cfg, num_classes)))
        print(f"wrote {out / 'coco_eval.json'}" + (f" and {min(draw, len(val_set))} drawings in "
                                                   f"{out / 'drawings'}" if draw else ""))
    return metrics


__all__ = ["COMMAND", "build_dataset", "build_detector", "config_for_resume", "evaluate_checkpoint", "train"]
