"""``sasa eval``: top-1 / top-5 / loss of a checkpoint, a safetensors file or a run directory on a dataset split."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..io.atomic import atomic_write_text
from ..io.checkpoint import (
    CheckpointError,
    check_compatible,
    load_checkpoint,
    load_safetensors,
    load_state_dict_checked,
    weights_file,
)
from ..process import configure_process
from .classify import evaluate
from .config import ConfigError
from .distributed import cleanup, init_distributed


def evaluate_weights(path: str | os.PathLike, *, dataset: str | None = None, data_dir: str | None = None,
                     split: str = "test", batch_size: int = 256, model: str | None = None, ema: bool = False,
                     device: str | None = None, workers: int = 0, holdout_fraction: float | None = None,
                     output: str | None = None, quiet: bool = False) -> dict:
    """Top-1 / top-5 / loss of a checkpoint (``.pt``), a safetensors file or a run directory on a dataset split.

    Settings missing from the arguments come from the weights' metadata and the run's ``config.yaml``.
    Writes the result as JSON (``output``, default beside the weights) and returns it.
    """
    from ..data import ShardSampler, build_data, collate_skip_bad
    from ..models import create_model

    path = Path(path)
    weights = weights_file(path, ema=ema)
    run_cfg: dict = {}
    for candidate in (path / "config.yaml", weights.parent / "config.yaml"):
        if candidate.is_file():
            import yaml

            run_cfg = yaml.safe_load(candidate.read_text()) or {}
            break
    if weights.suffix == ".safetensors":
        state, meta = load_safetensors(weights)
    else:
        ckpt = load_checkpoint(weights)
        meta = ckpt.get("meta", {})
        if ema and "ema" not in ckpt:
            raise CheckpointError(f"checkpoint {str(weights)!r} has no EMA weights (the run had ema_decay 0)")
        state = ({k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")} if ema
                 else ckpt["model"])
        run_cfg = run_cfg or ckpt.get("config", {})
    if not meta.get("model"):
        raise CheckpointError(f"{str(weights)!r} carries no model name in its metadata; it was not written by sasa")
    check_compatible(meta, model=model, source=str(weights))
    dataset = dataset or meta.get("dataset") or run_cfg.get("dataset")
    if dataset is None:
        raise ConfigError("dataset is not known from the weights; pass --dataset")
    same_data = dataset == run_cfg.get("dataset")
    data_dir = data_dir or (run_cfg.get("data_dir") if same_data else None)
    if holdout_fraction is None:
        holdout_fraction = run_cfg.get("holdout_fraction", 0.0) if same_data else 0.0
    if split not in ("test", "holdout"):
        raise ConfigError(f"split must be 'test' or 'holdout', got {split!r}")
    if split == "holdout" and not holdout_fraction:
        raise ConfigError("split 'holdout' needs --holdout-fraction (the run had none)")
    dist = init_distributed(device)
    configure_process(dist.device)
    try:
        data = build_data(dataset, data_dir=data_dir, image_size=meta.get("image_size"),
                          holdout_fraction=holdout_fraction or 0.0,
                          holdout_seed=run_cfg.get("holdout_seed", 0) if same_data else 0)
        check_compatible(meta, num_classes=data.num_classes, source=str(weights))
        net = create_model(meta["model"], num_classes=data.num_classes,
                           **{"in_chans": meta.get("in_chans", data.in_chans), **(meta.get("model_args") or {})})
        load_state_dict_checked(net, state, source=str(weights))
        net.to(dist.device)
        ds = data.val if split == "holdout" else (data.test if data.test is not None else data.val)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=workers,
                            sampler=ShardSampler(len(ds), num_replicas=dist.world_size, rank=dist.rank),
                            collate_fn=collate_skip_bad)
        amp = torch.bfloat16 if dist.device.type == "cuda" else None
        res = evaluate(net, loader, device=dist.device, amp_dtype=amp, show_progress=dist.is_main and not quiet)
    finally:
        cleanup()
    result = {"weights": str(weights), "model": meta["model"], "ema": ema, "dataset": dataset, "split": split,
              "images": res["count"], "top1": res["top1"], "top5": res["top5"], "loss": res["loss"],
              "unreadable": res["bad"]}
    out = Path(output) if output else weights.with_name(f"{weights.stem}.eval-{dataset}-{split}.json")
    if dist.is_main:
        atomic_write_text(out, json.dumps(result, indent=2))
    result["json"] = str(out)
    return result


def format_eval(result: dict) -> str:
    rows = [("weights", result["weights"] + (" (EMA)" if result["ema"] else "")), ("model", result["model"]),
            ("data", f"{result['dataset']} / {result['split']} ({result['images']} images)"),
            ("top-1", f"{result['top1']:.2f}%"), ("top-5", f"{result['top5']:.2f}%"),
            ("loss", f"{result['loss']:.4f}")]
    if result["unreadable"]:
        rows.append(("unreadable", str(result["unreadable"])))
    rows.append(("json", result["json"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
