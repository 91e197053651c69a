"""CIFAR-10 and CIFAR-100 from a local copy in torchvision's layout (``DIR/cifar-10-batches-py``,
``DIR/cifar-100-python``). Items are ``(PIL RGB image, label)``."""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


def check_local(name: str, data_dir: str | os.PathLike | None) -> Path:
    """The folder to pass to torchvision, or ``FileNotFoundError`` saying how to get the data."""
    if name not in FOLDERS:
        raise ValueError(f"dataset must be one of {tuple(FOLDERS)}, got {name!r}")
    how = (f"{name} needs a local copy: pass --data-dir DIR where DIR/{FOLDERS[name]} exists (torchvision's layout; "
           f"on a machine with network access: python -c \"import torchvision; torchvision.datasets."
           f"{'CIFAR10' if name == 'cifar10' else 'CIFAR100'}('DIR', download=True)\")")
    if not data_dir:
        raise FileNotFoundError(f"data_dir is not set. {how}")
    folder = Path(data_dir)
    if not (folder / FOLDERS[name]).is_dir():
        raise FileNotFoundError(f"data_dir {str(folder)!r} has no {FOLDERS[name]}/ folder. {how}")
    return folder


def cifar(name: str, data_dir: str | os.PathLike | None, split: str) -> Dataset:
    """The ``"train"`` or ``"test"`` split of ``name`` (``"cifar10"`` / ``"cifar100"``)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = check_local(name, data_dir)
    cls = CIFAR10 if name == "cifar10" else CIFAR100
    return cls(str(folder), train=split == "train", download=False)
