"""Per-sample transforms (torchvision ``transforms.v2``) for training and evaluation.

Augmentation policies (``augment``):
- ``"crop-flip"``: random crop with padding + horizontal flip, the classic small-image recipe (Fashion-MNIST,
  CIFAR, synthetic);
- ``"inception"``: Inception-style ``RandomResizedCrop`` + horizontal flip (the paper's ImageNet recipe; SPEC
  section 5); evaluation resizes to ``image_size / 0.875`` and centre-crops;
- ``"flip"``: horizontal flip only (the Fashion-MNIST default);
- ``"none"``: the evaluation transform for training too.

Small-image datasets are zero-padded symmetrically to ``image_size`` (28 -> 32 for Fashion-MNIST, so every
stride-2 stage of a ResNet sees an even map) rather than resized."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

AUGMENTS = ("crop-flip", "inception", "flip", "none")


def _finish(mean: tuple[float, ...], std: tuple[float, ...]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def small_image_transform(*, train: bool, augment: str, source_size: int, image_size: int,
                          mean: tuple[float, ...], std: tuple[float, ...], crop_padding: int = 4) -> Callable:
    """Transforms for datasets whose images are ``source_size`` pixels square (28 or 32)."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    ops: list = [v2.ToImage()]
    pad = (image_size - source_size) // 2 if image_size > source_size and (image_size - source_size) % 2 == 0 else 0
    if train and augment == "crop-flip" and (pad or image_size == source_size):
        # one crop from the image padded by pad + crop_padding == Pad(pad) then RandomCrop(padding=crop_padding)
        ops += [v2.RandomCrop(image_size, padding=pad + crop_padding), v2.RandomHorizontalFlip()]
        return v2.Compose(ops + _finish(mean, std)[1:])
    if pad:
        ops.append(v2.Pad(pad))
    elif image_size != source_size:
        ops.append(v2.Resize(image_size, antialias=True))
    if train and augment == "crop-flip":
        ops += [v2.RandomCrop(image_size, padding=crop_padding), v2.RandomHorizontalFlip()]
    elif train and augment == "inception":
        ops += [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    elif train and augment == "flip":
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops + _finish(mean, std)[1:])


def imagenet_transform(*, train: bool, augment: str, image_size: int, mean: tuple[float, ...],
                       std: tuple[float, ...], crop_fraction: float = 0.875) -> Callable:
    """Transforms for full-size photographs (ImageFolder trees)."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    if train and augment == "inception":
        ops = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    elif train and augment == "crop-flip":
        ops = [v2.Resize(image_size, antialias=True), v2.RandomCrop(image_size, padding=image_size // 8),
               v2.RandomHorizontalFlip()]
    elif train and augment == "flip":
        ops = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size), v2.RandomHorizontalFlip()]
    else:
        ops = [v2.Resize(round(image_size / crop_fraction), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([v2.ToImage(), *ops, *_finish(mean, std)[1:]])
