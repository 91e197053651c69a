"""ImageFolder trees in ImageNet layout: ``ROOT/train/<class>/<image>`` and ``ROOT/val/<class>/<image>``.

torchvision's ``ImageFolder`` does the scanning and the decoding (PIL); this module adds the layout check and the
class-list check between the two splits. Unreadable or corrupt files are *not* handled here: loading errors
propagate to ``sasa.data.loader.TransformedDataset``, which turns them into counted, reported skips."""

from __future__ import annotations

import os
from pathlib import Path

from torchvision.datasets import ImageFolder

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLITS = ("train", "val")


def check_layout(root: str | os.PathLike) -> None:
    """Raise ``FileNotFoundError`` naming what is missing when ``root`` is not an ImageNet-layout tree."""
    root = Path(root)
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"data_dir {str(root)!r} must hold the folders 'train/' and 'val/' with one "
                                f"sub-folder per class (ImageNet layout); missing: {missing}")


def image_folder(root: str | os.PathLike, split: str) -> ImageFolder:
    """The ``split`` ("train" or "val") of an ImageNet-layout tree; items are ``(PIL RGB image, label)``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_layout(root)
    return ImageFolder(str(Path(root) / split))


def check_same_classes(train: ImageFolder, val: ImageFolder) -> None:
    """The two splits must have the same class folders, in the same order (labels are folder indices)."""
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise ValueError(f"train/ and val/ have different class folders ({len(train.classes)} vs "
                         f"{len(val.classes)}); only in train: {only_train}, only in val: {only_val}")
