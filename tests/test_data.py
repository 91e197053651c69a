"""Data pipelines: Fashion-MNIST lookup, IDX parsing, ImageFolder with unreadable files, samplers, hold-out split,
order-free augmentation. All fast (no training)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image

from sasa.data import (
    Bad,
    ResumableDistributedSampler,
    ShardSampler,
    TransformedDataset,
    build_data,
    check_data_config,
    collate_skip_bad,
)
from sasa.data import fashion_mnist as fm
from sasa.data.folder import check_layout
from sasa.data.split import holdout_split
from sasa.data.synthetic import SyntheticImages


def _write_idx(path: Path, array: torch.Tensor) -> None:
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(struct.pack(">I", n) for n in array.shape)
    data = header + array.to(torch.uint8).numpy().tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _fake_fashion(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = fm.FILES[split]
        _write_idx(folder / f"{images}{ext}", torch.randint(0, 256, (n, 28, 28), generator=g))
        _write_idx(folder / f"{labels}{ext}", torch.arange(n) % 10)
    return folder


def test_fashion_mnist_from_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    where = _fake_fashion(tmp_path / "fm", gz=False)
    assert fm.locate(where, download=False) == where
    ds = fm.FashionMNIST(where, "train")
    image, label = ds[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and label == 3
    assert len(fm.FashionMNIST(where, "test")) == 10


def test_fashion_mnist_torchvision_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    _fake_fashion(tmp_path / "root" / "FashionMNIST" / "raw")
    assert fm.locate(tmp_path / "root", download=False) == tmp_path / "root"


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("SASA_NO_DOWNLOAD", "1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        fm.locate(tmp_path / "empty")
    assert f"into {tmp_path / 'empty'}" in str(info.value) and "missing train-images-idx3-ubyte" in str(info.value)


def test_fashion_mnist_named_folder_is_never_replaced(tmp_path, monkeypatch):
    """An empty or incomplete named folder is an error even when Debian's copy is there to fall back on."""
    monkeypatch.setattr(fm, "DEBIAN_DIR", _fake_fashion(tmp_path / "debian"))
    monkeypatch.setenv("SASA_NO_DOWNLOAD", "1")
    assert fm.locate(None) == tmp_path / "debian"  # nothing named: the Debian package
    (tmp_path / "empty").mkdir()
    partial = _fake_fashion(tmp_path / "partial")
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    for named, missing in ((tmp_path / "empty", "train-images-idx3-ubyte"), (partial, "t10k-labels-idx1-ubyte")):
        with pytest.raises(FileNotFoundError, match=f"missing .*{missing}") as info:
            fm.locate(named)
        assert str(tmp_path / "debian") not in str(info.value) and "apt-get install" in str(info.value)
        with pytest.raises(FileNotFoundError, match=str(named)):
            build_data("fashion-mnist", data_dir=named)


@pytest.mark.skipif(not fm.DEBIAN_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_debian_package():
    data = build_data("fashion-mnist", val_subset=100)
    assert data.source == str(fm.DEBIAN_DIR)
    assert (len(data.train), data.num_classes, data.in_chans, data.image_size) == (60000, 10, 1, 32)
    image, _ = data.train[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32


def test_read_idx_rejects_truncated(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    _write_idx(path, torch.zeros(4, 28, 28))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        fm.read_idx(path)


def test_synthetic_is_deterministic_per_index():
    a, b = SyntheticImages(32, seed=3), SyntheticImages(32, seed=3)
    assert torch.equal(a[5][0], b[5][0]) and a[5][1] == 5
    assert not torch.equal(a[5][0], SyntheticImages(32, seed=4)[5][0])


def test_augmentation_depends_only_on_seed_epoch_index():
    data = build_data("synthetic", train_subset=16)
    first = data.train[7][0]
    torch.manual_seed(123)  # the global RNG state must not matter ...
    _ = [data.train[i] for i in range(5)]  # ... nor what was loaded before
    assert torch.equal(data.train[7][0], first)
    data.train.set_epoch(1)
    assert not torch.equal(data.train[7][0], first)


def test_holdout_split_is_fixed_and_disjoint():
    train, hold = holdout_split(1000, 0.04, seed=0)
    assert len(hold) == 40 and len(train) == 960 and not set(train) & set(hold)
    assert (train, hold) == holdout_split(1000, 0.04, seed=0)
    with pytest.raises(ValueError, match="holdout_fraction"):
        holdout_split(10, 1.5)


def test_build_data_with_holdout_keeps_test_split():
    data = build_data("synthetic", holdout_fraction=0.1)
    assert data.val_name == "holdout" and data.test is not None
    assert len(data.train) + len(data.val) == 2048
    assert set(data.train.indices).isdisjoint(data.val.indices)


def test_samplers_resume_and_shard():
    ds = list(range(103))
    full = ResumableDistributedSampler(ds, num_replicas=1, rank=0, seed=5)
    full.set_epoch(2)
    order = list(full)
    full.set_epoch(2, start=40)
    assert list(full) == order[40:] and len(full) == len(order) - 40
    ranks = [ResumableDistributedSampler(ds, num_replicas=2, rank=r, seed=5) for r in range(2)]
    for s in ranks:
        s.set_epoch(2)
    r0, r1 = list(ranks[0]), list(ranks[1])
    # a global batch of 8 = 4 from each rank = the 1-process batch of 8
    assert sorted(r0[:4] + r1[:4]) == sorted(order[:8])
    shards = [list(ShardSampler(103, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == ds


def _png(path: Path, colour: int) -> None:
    Image.new("RGB", (20, 20), (colour, 0, 255 - colour)).save(path)


def _image_tree(root: Path, n: int = 6, corrupt: int = 1) -> Path:
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                _png(d / f"{i}.png", 40 * c + i)
    for i in range(corrupt):
        (root / "train" / "cat" / f"broken{i}.png").write_bytes(b"\x89PNG not really")
    return root


def test_imagefolder_skips_unreadable_files(tmp_path):
    root = _image_tree(tmp_path / "tree")
    data = build_data("imagefolder", data_dir=root, image_size=16)
    assert data.num_classes == 2 and data.classes == ("cat", "dog")
    items = [data.train[i] for i in range(len(data.train))]
    bad = [x for x in items if isinstance(x, Bad)]
    assert len(bad) == 1 and "broken0.png" in bad[0].where and "UnidentifiedImageError" in bad[0].reason
    batch = collate_skip_bad(items)
    assert batch.images.shape == (12, 3, 16, 16) and len(batch.bad) == 1


def test_imagefolder_layout_errors(tmp_path):
    (tmp_path / "t" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="'val'"):
        check_layout(tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="data_dir is required"):
        check_data_config("imagefolder", None)
    root = _image_tree(tmp_path / "tree", corrupt=0)
    (root / "val" / "dog").rename(root / "val" / "horse")
    with pytest.raises(ValueError, match="different class folders"):
        build_data("imagefolder", data_dir=root)


def test_cifar_needs_local_copy(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        check_data_config("cifar10", tmp_path)


def test_transformed_dataset_reports_loader_errors():
    class Flaky(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            if i == 1:
                raise OSError("disk on fire")
            return torch.zeros(1, 4, 4, dtype=torch.uint8), i

    ds = TransformedDataset(Flaky(), None)
    assert isinstance(ds[1], Bad) and "disk on fire" in ds[1].reason
    assert collate_skip_bad([ds[0], ds[1], ds[2]]).labels.tolist() == [0, 2]
