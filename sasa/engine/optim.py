"""Optimiser and learning-rate schedule: parameter groups without weight decay, Nesterov SGD or AdamW,
linear warm-up then cosine decay, stepped once per optimizer step.

Weight decay is not applied to (SPEC section 5): normalisation weights and every bias (all 1-D parameters),
``SelfAttention2d``'s relative embeddings (``rel_rows``, ``rel_cols``) and the ``AttentionStem``'s embeddings
(``emb_*``). The paper's learning rate is 1.6 at batch 4096 scaled linearly with the global batch
(``scaled_lr``)."""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_NAMES = ("rel_rows", "rel_cols")
NO_DECAY_PREFIXES = ("emb_",)


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for parameters excluded from weight decay (see the module docstring)."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or leaf in NO_DECAY_NAMES or leaf.startswith(NO_DECAY_PREFIXES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: ``{"params": decayed, "weight_decay": wd}`` and ``{"params": rest, "weight_decay": 0}``. Besides
    ``no_weight_decay``'s rule, the names a model lists in its own ``no_weight_decay()`` (timm's hook) go undecayed."""
    hook = getattr(model, "no_weight_decay", None)
    listed = set(hook()) if callable(hook) else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in listed or no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scaled_lr(lr: float, batch_size: int, base_batch: int | None) -> float:
    """``lr * batch_size / base_batch`` (linear scaling rule), or ``lr`` when ``base_batch`` is None."""
    return lr * batch_size / base_batch if base_batch else lr


def build_optimizer(model: nn.Module, *, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    nesterov: bool = True) -> torch.optim.Optimizer:
    """``"sgd"`` (momentum, Nesterov by default) or ``"adamw"`` (betas ``(momentum, 0.999)``) over
    ``param_groups``."""
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def warmup_cosine(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier at ``step`` (0-based): linear from 1/warmup_steps to 1, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int,
                    min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following ``warmup_cosine``, stepped after every optimizer step; its ``state_dict`` holds only
    numbers (the multiplier is a closure, not saved)."""
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"total_steps must be >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")

    def multiplier(step: int) -> float:
        return warmup_cosine(step, total_steps=total_steps, warmup_steps=warmup_steps, min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def optimization_for(cfg, module: nn.Module, steps_per_epoch: int):
    """``(lr, optimizer, scheduler)`` of a run config (``RunConfig``'s optimisation keys): the batch-scaled peak
    learning rate, ``build_optimizer`` and a ``build_scheduler`` spanning ``cfg.epochs``."""
    lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_base_batch)
    optimizer = build_optimizer(module, name=cfg.optimizer, lr=lr, weight_decay=cfg.weight_decay,
                                momentum=cfg.momentum, nesterov=cfg.nesterov)
    scheduler = build_scheduler(optimizer, total_steps=cfg.epochs * max(steps_per_epoch, 1),
                                warmup_steps=round(cfg.warmup_epochs * steps_per_epoch), min_ratio=cfg.min_lr_ratio)
    return lr, optimizer, scheduler
