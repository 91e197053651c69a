"""Benchmark settings and the per-device presets of ``sasa bench``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

MODES = ("layer", "op", "stem", "model")  # run order; "all" = every mode
SLOW_BACKENDS = ("reference",)  # the unfold oracle: k*k copies of K and V
LABELS = {"reference": "unfold (reference)"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def stage_shapes(image_size: int) -> list[tuple[int, int, int]]:
    """(H, W, C) of the 3x3 convolutions of ResNet-50's four stages (stride-1 blocks) for a square image."""
    s = image_size // 4
    return [(max(s >> i, 1), max(s >> i, 1), 64 << i) for i in range(4)]


@dataclass
class BenchConfig:
    """Everything one ``sasa bench`` run measures (see ``preset`` for the defaults per device)."""

    device: torch.device
    modes: tuple[str, ...] = MODES
    batch: int = 64
    shapes: list[tuple[int, int, int]] = field(default_factory=lambda: stage_shapes(256))
    kernel_size: int = 7
    heads: int = 8
    backends: list[str] | None = None  # layer mode: None = every backend available on the device
    skip_slow: bool = False
    slow_guard_gb: float | None = None  # layer mode: skip a slow backend whose estimated memory exceeds this
    models: list[str] = field(default_factory=lambda: ["resnet50", "sasa_resnet50_convstem", "sasa_resnet50"])
    model_batch: int = 64
    model_image_size: int = 256
    backend: str | None = None  # model mode: None = automatic choice
    compile: bool = False
    profile: int = 0  # model mode: top-N operators of one training step (torch.profiler), 0 = off
    dtype: str = "bf16"
    channels_last: bool = True
    warmup: int = 5
    repeats: int = 20
    model_warmup: int = 3
    model_repeats: int = 10
    image_size: int = 256  # for the record: the image size the layer shapes stand for

    def autocast(self):
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.dtype])

    def to_device(self, t: torch.Tensor | torch.nn.Module):
        t = t.to(self.device)
        return t.to(memory_format=torch.channels_last) if self.channels_last else t


def preset(device: str, *, small: bool = False) -> BenchConfig:
    """Defaults: GPU = ResNet-50 stage shapes and models at batch 64, 256x256, bf16 autocast, channels_last;
    CPU = batch 2, the 32x32x128 target shape plus the stages of a 128x128 image, ResNet-26 models at batch 8,
    128x128, fp32; ``small`` = tiny shapes and models that run in seconds on CPU (the test's setting)."""
    dev = torch.device(device)
    if small:
        return BenchConfig(dev, batch=1, shapes=[(8, 8, 16), (5, 7, 32)], heads=2, image_size=32,
                           models=["test_resnet", "test_sasa_resnet"], model_batch=2, model_image_size=32,
                           dtype="fp32", channels_last=False, warmup=1, repeats=2, model_warmup=1, model_repeats=2)
    if dev.type == "cuda":
        return BenchConfig(dev, slow_guard_gb=40.0)
    return BenchConfig(dev, batch=2, shapes=[(32, 32, 128)] + stage_shapes(128), image_size=128,
                       models=["resnet26", "sasa_resnet26_convstem", "sasa_resnet26"], model_batch=8,
                       model_image_size=128, dtype="fp32", channels_last=False, warmup=2, repeats=10,
                       model_warmup=1, model_repeats=3)
