"""A synthetic, learnable image-classification dataset for smoke tests and benchmarks (no files, no network).

Each class has a fixed random low-frequency template; sample ``i`` is its class template plus noise drawn from a
generator seeded with ``(seed, i)``, so any item is reproducible on its own, in any order, on any rank. Labels are
``i % num_classes``. Items are ``(uint8 tensor (C, S, S), int label)`` like the real datasets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class SyntheticImages(Dataset):
    """``num_samples`` images of ``channels x image_size x image_size`` in ``num_classes`` classes; ``seed`` fixes
    the noise (use one per split), ``noise`` is its amplitude relative to the template contrast (higher is harder)."""

    def __init__(self, num_samples: int = 2048, *, num_classes: int = 10, image_size: int = 32, channels: int = 3,
                 seed: int = 0, noise: float = 0.6) -> None:
        for name, value in (("num_samples", num_samples), ("num_classes", num_classes),
                            ("image_size", image_size), ("channels", channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_samples, self.num_classes = num_samples, num_classes
        self.image_size, self.channels, self.seed, self.noise = image_size, channels, seed, noise
        self.classes = tuple(f"class_{i}" for i in range(num_classes))
        g = torch.Generator().manual_seed(1234)  # templates are shared by every split
        coarse = torch.randn(num_classes, channels, 4, 4, generator=g)
        self.templates = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        label = index % self.num_classes
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        noise = torch.randn(self.channels, self.image_size, self.image_size, generator=g)
        image = self.templates[label] + self.noise * noise  # (C, S, S), roughly N(0, 1)
        return (image * 48 + 128).clamp(0, 255).to(torch.uint8), label
