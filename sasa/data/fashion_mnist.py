"""Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test 28x28 grey images in 10 classes.

The default dataset of ``sasa train``. The first place with the four IDX files wins: a named ``data_dir`` (``*-ubyte``
files, gzipped or not, or torchvision's ``FashionMNIST/raw/``; else torchvision's download into it; a named folder is
never replaced by another source); without one, ``/usr/share/datasets/fashion-mnist`` (Debian's package, ``make
data``), then ``~/.cache/sasa`` (downloaded); otherwise ``FileNotFoundError`` saying what was looked for where.
``SASA_NO_DOWNLOAD=1`` skips downloads. Images stay in memory as uint8 ``(N, 1, 28, 28)``, returned untransformed.
"""

from __future__ import annotations

import gzip
import os
import socket
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..settings import no_download

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = (0.2860,), (0.3530,)
HOW_TO_GET = (
    "Fashion-MNIST was not found. Get it one of these ways:\n"
    "  - Debian/Ubuntu: apt-get install dataset-fashion-mnist   (files land in /usr/share/datasets/fashion-mnist)\n"
    "  - or download the four files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,\n"
    "    t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz from https://github.com/zalandoresearch/fashion-mnist\n"
    "    into a folder and pass --data-dir FOLDER\n"
    "  - or run once with network access: sasa train downloads them with torchvision."
)


def _find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name, folder / "FashionMNIST" / "raw" / name,
                      folder / "FashionMNIST" / "raw" / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _folder_has_all(folder: Path) -> bool:
    return all(_find_file(folder, n) is not None for names in FILES.values() for n in names)


def _download(root: Path) -> bool:
    """torchvision's downloader; ``False`` when offline or disabled."""
    if no_download():
        return False
    from torchvision.datasets import FashionMNIST

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception:  # noqa: BLE001  (URLError, RuntimeError, OSError: any failure means "no network")
        return False
    finally:
        socket.setdefaulttimeout(previous)
    return _folder_has_all(root)


def _missing(folder: Path) -> list[str]:
    return [n for names in FILES.values() for n in names if _find_file(folder, n) is None]


def locate(data_dir: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """The folder holding the four Fashion-MNIST files, in the lookup order of the module docstring."""
    candidates = [Path(data_dir)] if data_dir else [DEBIAN_DIR, Path.home() / ".cache" / "sasa"]
    for folder in candidates:
        if folder.is_dir() and _folder_has_all(folder):
            return folder
    root = candidates[-1]
    if download and _download(root):
        return root
    looked = "; ".join(f"{c}: " + ("no such folder" if not c.is_dir() else "missing " + ", ".join(_missing(c)))
                       for c in candidates)
    how = HOW_TO_GET
    if data_dir:
        how = how.replace("into a folder and pass --data-dir FOLDER", f"into {data_dir}").replace(
            "/usr/share/datasets/fashion-mnist)", "/usr/share/datasets/fashion-mnist) and leave out --data-dir")
    raise FileNotFoundError(f"{how}\n(looked for {', '.join(n + '[.gz]' for ns in FILES.values() for n in ns)} "
                            f"in {looked}; download into {root}: {'failed or offline' if download else 'disabled'})")


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """An IDX file (``.gz`` or plain) as a uint8 tensor of its stated shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{str(path)!r} is not an unsigned-byte IDX file (magic {data[:4].hex()!r})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{str(path)!r} is truncated: header says {dims}, found {body.size} bytes")
    return torch.from_numpy(body.copy()).view(*dims)


class FashionMNIST(Dataset):
    """Fashion-MNIST ``split`` (``"train"`` or ``"test"``) of a ``locate``d ``folder``; items are
    ``(uint8 tensor (1, 28, 28), int label)``."""

    classes = CLASSES

    def __init__(self, folder: str | os.PathLike, split: str = "train") -> None:
        if split not in FILES:
            raise ValueError(f"split must be one of {tuple(FILES)}, got {split!r}")
        folder = Path(folder)
        images_name, labels_name = FILES[split]
        paths = [_find_file(folder, images_name), _find_file(folder, labels_name)]
        if any(p is None for p in paths):
            raise FileNotFoundError(f"{HOW_TO_GET}\n(missing {images_name} or {labels_name} in {str(folder)!r})")
        self.images = read_idx(paths[0]).unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
        self.targets = read_idx(paths[1]).long()
        if len(self.images) != len(self.targets):
            raise ValueError(f"Fashion-MNIST {split}: {len(self.images)} images but {len(self.targets)} labels")
        self.source = str(folder)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])
