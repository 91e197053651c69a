"""``sasa train``: a validated ``TrainConfig`` in, objects built and handed to the shared ``Trainer`` with a
``ClassificationTask``, a run directory out (``rundir.py``), plus ``model.safetensors`` (+ ``model_ema.safetensors``),
``metrics.png`` and ``summary.json`` at the end. Under ``torchrun`` only rank 0 writes.

Exit codes: 0 done; 1 the run failed on its data or its loss (the message says where); 128 + signal number (130
SIGINT, 143 SIGTERM) when stopped by a signal after saving ``last.pt``."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..io.atomic import atomic_write_text
from ..io.checkpoint import check_compatible, save_safetensors
from ..process import configure_process
from . import config as C
from . import rundir
from .classify import ClassificationTask, NonFiniteLossError, TooManyBadSamplesError, evaluate
from .distributed import DistInfo, barrier, cleanup, init_distributed, parallelize
from .environment import collect_environment, git_commit
from .metrics import plot_metrics
from .rundir import say
from .signals import GracefulStop
from .trainer import Trainer, amp_dtype

COMMAND = "sasa train"

def precheck(cfg: C.TrainConfig) -> None:
    """Checks that need no data and no model weights: the model name and its overrides, the data location."""
    from ..data import check_data_config
    from ..models import create_model, list_models

    if cfg.model not in list_models():
        raise C.ConfigError(f"config key 'model': unknown model {cfg.model!r}; valid: {', '.join(list_models())}")
    try:
        with torch.device("meta"):
            create_model(cfg.model, num_classes=10, **{"in_chans": 3, **cfg.model_args})
    except (TypeError, ValueError) as err:
        raise C.ConfigError(f"config key 'model_args' {cfg.model_args} does not fit model {cfg.model!r}: {err}") \
            from err
    try:
        check_data_config(cfg.dataset, cfg.data_dir)
    except FileNotFoundError as err:
        raise C.ConfigError(f"config key 'data_dir': {err}") from err


def _model_meta(cfg: C.TrainConfig, data) -> dict:
    return {"model": cfg.model, "model_args": C.to_dict(cfg)["model_args"], "num_classes": data.num_classes,
            "in_chans": data.in_chans, "image_size": data.image_size, "dataset": cfg.dataset}


def _loader(dataset, sampler, batch_size: int, cfg: C.TrainConfig, device: torch.device, *, train: bool):
    from ..data import collate_skip_bad

    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=cfg.workers,
                      collate_fn=collate_skip_bad, pin_memory=device.type == "cuda", drop_last=train,
                      generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched
                      persistent_workers=False, prefetch_factor=4 if cfg.workers else None)


def _check(cfg: C.TrainConfig, num_classes: int | None = None) -> Callable[[dict, str], None]:
    return lambda meta, source: check_compatible(meta, model=cfg.model, num_classes=num_classes, source=source)


def config_for_resume(resume: str | os.PathLike, overrides: dict) -> C.TrainConfig:
    """The config saved in the run directory ``resume`` names, with the keys a resumed run may change."""
    return rundir.config_for_resume(resume, overrides, schema=C.TrainConfig, command=COMMAND)


def train(cfg: C.TrainConfig) -> int:
    """Run (or resume) a training run described by ``cfg``; returns the process exit code."""
    t0 = time.time()
    precheck(cfg)
    if cfg.resume and (summary := rundir.finished_summary(cfg, check=_check(cfg), complete=_complete,
                                                          command=COMMAND)) is not None:
        rundir.say_finished(rundir.resume_paths(cfg.resume)[0], summary, f"test top-1 {summary['top1']:.2f}%")
        return 0
    dist = init_distributed(cfg.device)
    configure_process(dist.device, threads=cfg.threads)
    try:
        return _train(cfg, dist, t0)
    finally:
        cleanup()


def _train(cfg: C.TrainConfig, dist: DistInfo, t0: float) -> int:
    from ..data import ResumableDistributedSampler, ShardSampler, build_data
    from ..models import create_model
    from .ema import build_ema
    from .optim import optimization_for
    from .syncbn import convert_sync_batchnorm

    if cfg.batch_size % dist.world_size:
        raise C.ConfigError(f"config key 'batch_size' ({cfg.batch_size}) must be divisible by the number of "
                            f"processes ({dist.world_size})")
    local_batch = cfg.batch_size // dist.world_size
    device = dist.device

    data = build_data(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size, augment=cfg.augment,
                      holdout_fraction=cfg.holdout_fraction, holdout_seed=cfg.holdout_seed,
                      train_subset=cfg.train_subset, val_subset=cfg.val_subset, seed=cfg.seed)
    run = rundir.RunDirectory(cfg, dist, command=COMMAND, meta=_model_meta(cfg, data), default_name=os.path.join(
        "runs", f"{cfg.model}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"))
    run.started = t0
    torch.manual_seed(cfg.seed)
    module = create_model(cfg.model, num_classes=data.num_classes, **{"in_chans": data.in_chans, **cfg.model_args})
    if cfg.sync_bn and dist.distributed:
        module = convert_sync_batchnorm(module, device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    module.to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    ema = build_ema(module, cfg.ema_decay) if cfg.ema_decay > 0 else None
    model = parallelize(module, dist, compile=cfg.compile)

    sampler = ResumableDistributedSampler(data.train, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                          seed=cfg.seed, drop_last=True)
    train_loader = _loader(data.train, sampler, local_batch, cfg, device, train=True)
    val_loader = _loader(data.val, ShardSampler(len(data.val), num_replicas=dist.world_size, rank=dist.rank),
                         local_batch, cfg, device, train=False)
    steps_per_epoch = sampler.num_samples // local_batch
    lr, optimizer, scheduler = optimization_for(cfg, module, steps_per_epoch)

    with GracefulStop() as stop:
        amp = amp_dtype(cfg.amp, device)
        task = ClassificationTask(val_loader=val_loader, device=device, label_smoothing=cfg.label_smoothing,
                                  channels_last=channels_last, amp_dtype=amp)
        trainer = Trainer(
            task=task, model=model, module=module, optimizer=optimizer, scheduler=scheduler, train_loader=train_loader,
            dist=dist, epochs=cfg.epochs, ema=ema, amp_dtype=amp, grad_clip=cfg.grad_clip, logger=run.logger,
            log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every, save=run.save,
            stop=stop, max_bad_fraction=cfg.max_bad_fraction, quiet=cfg.quiet)
        env = collect_environment(device, dist.world_size)
        env.update(data_source=data.source, steps_per_epoch=steps_per_epoch, local_batch=local_batch, lr=lr)
        run.start(trainer, env, check=_check(cfg, data.num_classes))
        n_params = sum(p.numel() for p in module.parameters())
        say(dist, f"sasa train: {cfg.model} ({n_params / 1e6:.2f} M params) on {cfg.dataset} "
                  f"({len(data.train)} train / {len(data.val)} {data.val_name} images from {data.source}); "
                  f"{dist.world_size} x {device}, batch {cfg.batch_size}, lr {lr:g}, {cfg.epochs} epochs of "
                  f"{steps_per_epoch} steps -> {run.path}")
        try:
            status = trainer.fit()
        except (NonFiniteLossError, TooManyBadSamplesError) as err:
            say(dist, f"sasa train: error: {err}")
            return 1
    if status == "stopped":
        return run.stopped(stop)

    summary = _finish(cfg, dist, data, trainer, module, ema, run.meta, run.path, val_loader, local_batch, t0,
                      n_params)
    if dist.is_main:
        say(dist, format_summary(summary, run.path))
    barrier()
    return 0


def _complete(summary: dict) -> bool:
    """Whether a summary holds the finished run's test figures (finite numbers)."""
    return all(isinstance(summary.get(k), (int, float)) and math.isfinite(summary[k])
               for k in ("top1", "top5", "loss"))


def _finish(cfg, dist, data, trainer, module, ema, meta, run_dir, val_loader, local_batch, t0, n_params) -> dict:
    """Final evaluation on the test split, weights as safetensors, plot, ``summary.json``."""
    from ..data import ShardSampler

    device = dist.device
    final = dict(trainer.last_eval)
    if "val_top1" not in final:  # resumed after its last epoch but before this evaluation: evaluate now
        final = trainer.validate()
    test = {"top1": final.get("val_top1"), "top5": final.get("val_top5"), "loss": final.get("val_loss")}
    test_ema = {"top1": final.get("val_top1_ema"), "top5": final.get("val_top5_ema"),
                "loss": final.get("val_loss_ema")}
    if data.test is not None:  # validation was a hold-out: report the official test split too
        loader = _loader(data.test, ShardSampler(len(data.test), num_replicas=dist.world_size, rank=dist.rank),
                         local_batch, cfg, device, train=False)
        kw = {"device": device, "amp_dtype": trainer.task.amp_dtype, "channels_last": trainer.task.channels_last}
        test = evaluate(module, loader, **kw)
        if ema is not None:
            test_ema = evaluate(ema.module, loader, **kw)
    p = trainer.progress
    wall = p.elapsed_s + (time.time() - t0)
    summary = {"model": cfg.model, "model_args": C.to_dict(cfg)["model_args"], "params_m": round(n_params / 1e6, 4),
               "dataset": cfg.dataset, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
               "top1": test["top1"], "top5": test["top5"], "loss": test["loss"],
               "best_val_top1": p.best_score, "best_epoch": p.best_epoch, "val_split": data.val_name,
               "wall_s": round(wall, 1), "world_size": dist.world_size, "device": str(device),
               "bad_train_images": int(p.bad_train_total), "seed": cfg.seed, **git_commit()}
    if data.test is not None:
        summary.update(holdout_top1=final.get("val_top1"), holdout_top1_ema=final.get("val_top1_ema"))
    if ema is not None:
        summary.update(top1_ema=test_ema["top1"], top5_ema=test_ema["top5"], loss_ema=test_ema["loss"])
    if p.bad_examples:
        summary["bad_examples"] = p.bad_examples
    if not _complete(summary):
        raise RuntimeError(f"the final evaluation gave no test figures ({test}); the run directory was left as it was")
    if dist.is_main:
        save_safetensors(run_dir / "model.safetensors", module.state_dict(), {**meta, "top1": summary["top1"]})
        if ema is not None:
            save_safetensors(run_dir / "model_ema.safetensors", ema.module.state_dict(),
                             {**meta, "top1": summary["top1_ema"], "ema": True})
        try:
            plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png",
                         title=f"{cfg.model} on {cfg.dataset}: test top-1 {summary['top1']:.2f}%")
        except Exception as err:  # noqa: BLE001  (a plot must never fail a finished run)
            print(f"sasa train: warning: could not draw metrics.png: {err}", file=sys.stderr)
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict, run_dir: Path) -> str:
    """The table printed at the end of a run."""
    rows = [("model", f"{summary['model']} ({summary['params_m']:.2f} M params)"),
            ("dataset", f"{summary['dataset']}, {summary['epochs']} epochs, batch {summary['batch_size']}"),
            ("test top-1 / top-5", f"{summary['top1']:.2f}% / {summary['top5']:.2f}%  (loss {summary['loss']:.4f})")]
    if "top1_ema" in summary and summary["top1_ema"] is not None:
        rows.append(("EMA test top-1 / top-5", f"{summary['top1_ema']:.2f}% / {summary['top5_ema']:.2f}%"))
    if "holdout_top1" in summary:
        rows.append(("hold-out top-1", f"{summary['holdout_top1']:.2f}%"))
    rows.append(("best val top-1", f"{summary['best_val_top1']:.2f}% (epoch {summary['best_epoch']})"))
    if summary.get("bad_train_images"):
        rows.append(("unreadable images", f"{summary['bad_train_images']} skipped"))
    minutes, seconds = divmod(summary["wall_s"], 60)
    rows.append(("wall time", f"{int(minutes)}m{seconds:04.1f}s on {summary['world_size']} x {summary['device']}"))
    rows.append(("run directory", str(run_dir)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "summary"] + [f"  {k:<{width}}  {v}" for k, v in rows])
