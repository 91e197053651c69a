"""How batches are drawn; three properties the training engine relies on:

- **Order-free augmentation.** ``TransformedDataset`` seeds sample ``j``'s transform in epoch ``e`` from ``(seed, e,
  j)`` alone, so a 2-process run equals a 1-process one and a resumed run an uninterrupted one.
- **Unreadable samples are skipped.** A load raising ``OSError`` / ``ValueError`` / ``SyntaxError`` gives a ``Bad``
  record; ``collate_skip_bad`` drops it and lists it in ``Batch.bad`` for the loop to count.
- **Mid-epoch resume.** ``ResumableDistributedSampler`` (torchvision's ``DistributedSampler`` shuffle and split) can
  start ``start`` samples into an epoch; ``ShardSampler`` splits evaluation data without padding (exact sums).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torch.utils.data.dataloader import default_collate

LOAD_ERRORS = (OSError, ValueError, SyntaxError)  # PIL: UnidentifiedImageError is an OSError; truncation too


class Bad(NamedTuple):
    """A sample that could not be loaded: dataset index, where it lives (a path when known), and why."""

    index: int
    where: str
    reason: str


class Batch(NamedTuple):
    """A collated batch: ``images (B, C, H, W)``, ``labels (B,)``, and the ``Bad`` records dropped from it."""

    images: torch.Tensor
    labels: torch.Tensor
    bad: list


def _mix(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63 - 1)


class TransformedDataset(Dataset):
    """``base`` (items ``(raw image, label)``) restricted to ``indices`` (``None``: all) with ``transform`` applied
    to the image, its randomness reseeded per sample from ``seed`` (module docstring)."""

    def __init__(self, base: Dataset, transform: Callable | None, *, indices: Sequence[int] | None = None,
                 seed: int = 0) -> None:
        self.base = base
        self.transform = transform
        self.indices = list(indices) if indices is not None else None
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draw (call before iterating a new epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)

    def _where(self, j: int) -> str:
        samples = getattr(self.base, "samples", None)
        if samples is not None and 0 <= j < len(samples):
            return str(samples[j][0])
        return f"index {j}"

    def __getitem__(self, i: int):
        j = self.indices[i] if self.indices is not None else i
        try:
            image, label = self.base[j]
        except LOAD_ERRORS as err:
            return Bad(j, self._where(j), f"{type(err).__name__}: {err}")
        if self.transform is None:
            return image, label
        gen = torch.default_generator
        state = gen.get_state()
        gen.manual_seed(_mix(self.seed, self.epoch, j))
        try:
            image = self.transform(image)
        except OSError as err:  # a truncated file PIL decodes lazily
            return Bad(j, self._where(j), f"{type(err).__name__}: {err}")
        finally:
            gen.set_state(state)
        return image, label


def collate_skip_bad(items: list) -> Batch:
    """``default_collate`` of the readable items; unreadable ones go to ``Batch.bad``."""
    bad = [x for x in items if isinstance(x, Bad)]
    good = [x for x in items if not isinstance(x, Bad)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), bad)
    images, labels = default_collate(good)
    return Batch(images, labels, bad)


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can begin ``start`` samples into this rank's share of the epoch;
    ``num_replicas`` and ``rank`` are explicit, so a world of 1 needs no process group."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start`` samples (of this rank)."""
        super().set_epoch(epoch)
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}")
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...`` in order: every sample exactly once across ranks, no padding."""

    def __init__(self, num_samples: int, *, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, num_samples, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
