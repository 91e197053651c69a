"""Model mode: training-step and inference throughput of the conv ResNet and its SASA variants, side by side.

A training step is forward, cross-entropy on random labels, backward and an SGD (momentum 0.9) update, on one
fixed random batch. Inference is a forward in eval mode under ``torch.inference_mode``. ``vs_conv`` divides a
model's training images/s by the first attention-free model's in the same run (SPEC section 7's "ratio to conv").
A model entry may carry constructor arguments after ``@``: ``sasa_resnet50_convstem@recompute_qkv=True`` (several
``@key=value`` parts allowed), so variants of one model are measured side by side.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .. import backends, settings
from ..models import create_model
from .config import LABELS, BenchConfig
from .timing import is_oom, peak_mb, sync, time_ms, top_ops


def _has_attention(model: torch.nn.Module) -> bool:
    from ..layers.attention import SelfAttention2d

    return any(isinstance(m, SelfAttention2d) for m in model.modules())


def parse_model(spec: str) -> tuple[str, dict]:
    """``"name@key=value@key=value"`` -> ``(name, {key: value})`` (values as Python literals, else strings)."""
    from ..models.args import parse_model_args

    name, *args = spec.split("@")
    return name, parse_model_args(args)


def _measure(spec: str, cfg: BenchConfig) -> dict:
    name, overrides = parse_model(spec)
    if cfg.backend:
        overrides["backend"] = cfg.backend
    model = cfg.to_device(create_model(name, num_classes=1000, **overrides))
    row = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    attention = _has_attention(model)
    run = torch.compile(model) if cfg.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = cfg.to_device(torch.randn(cfg.model_batch, overrides.get("in_chans", 3), cfg.model_image_size,
                                  cfg.model_image_size))  # in_chans=1: grayscale models (Fashion-MNIST)
    y = torch.randint(0, 1000, (cfg.model_batch,), device=cfg.device)

    def train_step():
        opt.zero_grad(set_to_none=True)
        with cfg.autocast():
            loss = F.cross_entropy(run(x), y)
        loss.backward()
        opt.step()

    model.train()
    t0 = time.perf_counter()
    with backends.record() as used:  # the window op's choice per layer shape (some backends decline some shapes)
        train_step()  # first call: compilation, kernel selection, allocator warm-up
    sync(cfg.device)
    row["first_step_s"] = time.perf_counter() - t0
    if attention:
        names = sorted(name for op, name in used if op == "window") or ["?"]
        how = "" if cfg.backend else " (SASA_BACKEND)" if settings.backend("window") else " (auto)"
        row["backend"] = "+".join(LABELS.get(n, n) for n in names) + how
    row["train_ms"] = time_ms(train_step, cfg.device, warmup=cfg.model_warmup, repeats=cfg.model_repeats)
    row["train_img_s"] = cfg.model_batch / row["train_ms"]["median"] * 1e3
    row["peak_mb"] = peak_mb(train_step, cfg.device)
    if cfg.device.type == "cuda":
        row["peak_total_mb"] = torch.cuda.max_memory_allocated(cfg.device) / 2**20
    if cfg.profile:
        row["profile"] = top_ops(train_step, cfg.device, cfg.profile)
    model.eval()

    def infer():
        with torch.inference_mode(), cfg.autocast():
            run(x)

    row["infer_ms"] = time_ms(infer, cfg.device, warmup=cfg.model_warmup, repeats=cfg.model_repeats)
    row["infer_img_s"] = cfg.model_batch / row["infer_ms"]["median"] * 1e3
    return row


def model_rows(cfg: BenchConfig, log=print) -> list[dict]:
    rows, baseline = [], None
    for name in cfg.models:
        row = {"model": name, "backend": None, "batch": cfg.model_batch, "image_size": cfg.model_image_size,
               "compile": cfg.compile, "error": None}
        try:
            row.update(_measure(name, cfg))
        except Exception as err:  # noqa: BLE001  (a failing model or backend is a row, not a crash)
            row["error"] = "OOM" if is_oom(err) else f"{type(err).__name__}: {err}".splitlines()[0][:200]
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
        if row["error"] is None:
            if baseline is None and row["backend"] is None:
                baseline = row
            if baseline is not None:
                row["vs_conv"] = row["train_img_s"] / baseline["train_img_s"]
        rows.append(row)
        log(f"  model {name:<24} " + (row["error"] or f"train {row['train_img_s']:8.1f} img/s  "
                                                    f"infer {row['infer_img_s']:8.1f} img/s"))
    return rows
