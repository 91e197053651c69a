"""Dataset name -> train / validation / test datasets with their transforms (``build_data``).

Names (the ``--dataset`` strings): ``fashion-mnist`` (default, 28 px grey, padded to 32), ``imagefolder`` (an
ImageNet-layout tree), ``cifar10`` / ``cifar100`` (a local copy), ``synthetic`` (generated, for smoke tests).
With ``holdout_fraction > 0`` the validation set is that fraction of the training set (the paper's 4% split) and
the official test/val split is kept as ``test`` for the final report; otherwise validation *is* the test split."""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch.utils.data import Dataset

from . import cifar, fashion_mnist, folder, synthetic
from .loader import TransformedDataset
from .split import holdout_split
from .transforms import imagenet_transform, small_image_transform

DATASETS = ("fashion-mnist", "imagefolder", "cifar10", "cifar100", "synthetic")
DEFAULT_IMAGE_SIZE = {"fashion-mnist": 32, "imagefolder": 224, "cifar10": 32, "cifar100": 32, "synthetic": 32}
DEFAULT_AUGMENT = {"fashion-mnist": "flip", "imagefolder": "inception", "cifar10": "crop-flip",
                   "cifar100": "crop-flip", "synthetic": "crop-flip"}
SYNTHETIC_SIZES = {"train": 2048, "test": 512}


@dataclass
class DataBundle:
    """What the engine needs to know about the data. ``val`` is the per-epoch validation set: the hold-out split
    (``val_name="holdout"``, and ``test`` the official test/val split) or the test split (``"test"``, ``test`` None);
    ``source`` says where the files came from."""

    train: TransformedDataset
    val: TransformedDataset
    test: TransformedDataset | None
    num_classes: int
    in_chans: int
    image_size: int
    classes: tuple
    source: str
    val_name: str


def check_data_config(name: str, data_dir: str | os.PathLike | None) -> None:
    """Cheap checks run before any work starts: the name, and that a required ``data_dir`` exists."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir {str(data_dir)!r} does not exist or is not a folder")
    if name == "imagefolder":
        if data_dir is None:
            raise FileNotFoundError("data_dir is required for dataset 'imagefolder' (a folder with train/ and val/)")
        folder.check_layout(data_dir)
    if name in cifar.FOLDERS:
        cifar.check_local(name, data_dir)


def _raw(name: str, data_dir, split: str, image_size: int) -> tuple[Dataset, str]:
    """(untransformed dataset, source description); ``split`` is "train" or "test"."""
    if name == "fashion-mnist":
        where = fashion_mnist.locate(data_dir)
        return fashion_mnist.FashionMNIST(where, split), str(where)
    if name == "imagefolder":
        return folder.image_folder(data_dir, "train" if split == "train" else "val"), str(data_dir)
    if name in cifar.FOLDERS:
        return cifar.cifar(name, data_dir, split), str(data_dir)
    return synthetic.SyntheticImages(SYNTHETIC_SIZES[split], image_size=image_size,
                                     seed=0 if split == "train" else 1), "generated"


def _transform(name: str, *, train: bool, augment: str, image_size: int):
    if name == "imagefolder":
        return imagenet_transform(train=train, augment=augment, image_size=image_size, mean=folder.MEAN,
                                  std=folder.STD)
    if name == "fashion-mnist":
        return small_image_transform(train=train, augment=augment, source_size=28, image_size=image_size,
                                     mean=fashion_mnist.MEAN, std=fashion_mnist.STD, crop_padding=2)
    if name in cifar.FOLDERS:
        return small_image_transform(train=train, augment=augment, source_size=32, image_size=image_size,
                                     mean=cifar.MEAN, std=cifar.STD)
    return small_image_transform(train=train, augment=augment, source_size=image_size, image_size=image_size,
                                 mean=synthetic.MEAN, std=synthetic.STD, crop_padding=2)


def build_data(name: str, *, data_dir: str | os.PathLike | None = None, image_size: int | None = None,
               augment: str | None = None, holdout_fraction: float = 0.0, holdout_seed: int = 0,
               train_subset: int | None = None, val_subset: int | None = None, seed: int = 0) -> DataBundle:
    """The datasets of a run on ``name`` (one of ``DATASETS``).

    Args:
        data_dir: where the files are (each dataset's module has the lookup rules).
        image_size, augment: ``None`` for the dataset's default (``DEFAULT_IMAGE_SIZE``, ``DEFAULT_AUGMENT``).
        holdout_fraction, holdout_seed: the fraction of the training set held out as validation (0: none), and
            the seed that picks it.
        train_subset, val_subset: keep only the first N samples.
        seed: augmentation seed.
    """
    check_data_config(name, data_dir)
    image_size = image_size or DEFAULT_IMAGE_SIZE[name]
    augment = augment or DEFAULT_AUGMENT[name]
    train_raw, source = _raw(name, data_dir, "train", image_size)
    test_raw, _ = _raw(name, data_dir, "test", image_size)
    if name == "imagefolder":
        folder.check_same_classes(train_raw, test_raw)
    train_tf = _transform(name, train=True, augment=augment, image_size=image_size)
    eval_tf = _transform(name, train=False, augment=augment, image_size=image_size)
    train_idx: list[int] | None = None
    test = None
    if holdout_fraction:
        train_idx, hold_idx = holdout_split(len(train_raw), holdout_fraction, seed=holdout_seed)
        val = TransformedDataset(train_raw, eval_tf, indices=hold_idx[:val_subset] if val_subset else hold_idx)
        test = TransformedDataset(test_raw, eval_tf)
        val_name = "holdout"
    else:
        val_idx = list(range(min(val_subset, len(test_raw)))) if val_subset else None
        val = TransformedDataset(test_raw, eval_tf, indices=val_idx)
        val_name = "test"
    if train_subset:
        train_idx = (train_idx if train_idx is not None else list(range(len(train_raw))))[:train_subset]
    train = TransformedDataset(train_raw, train_tf, indices=train_idx, seed=seed)
    classes = tuple(getattr(train_raw, "classes", ()))
    sample = train_raw[0][0] if name != "imagefolder" else None
    in_chans = 3 if sample is None else (sample.shape[0] if hasattr(sample, "shape") else len(sample.getbands()))
    return DataBundle(train=train, val=val, test=test, num_classes=len(classes), in_chans=in_chans,
                      image_size=image_size, classes=classes, source=source, val_name=val_name)
