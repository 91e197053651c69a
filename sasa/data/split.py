"""The paper's hold-out split: a fixed fraction of the training set set aside as validation data.

Ramachandran et al. tuned on a 4% hold-out of ImageNet's training set (SPEC section 5). The split depends only on
the dataset size, the fraction and ``seed`` (not on the training seed), so every run and every rank sees the same
one."""

from __future__ import annotations

import torch


def holdout_split(num_samples: int, fraction: float, *, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(train_indices, holdout_indices)``: a seeded random ``fraction`` of ``range(num_samples)`` held out; both
    sorted, so file-system locality of ordered datasets is kept."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {fraction!r}")
    n_hold = round(num_samples * fraction)
    if n_hold < 1 or n_hold >= num_samples:
        raise ValueError(f"holdout_fraction={fraction} of {num_samples} samples leaves an empty split")
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    hold = sorted(perm[:n_hold].tolist())
    train = sorted(perm[n_hold:].tolist())
    return train, hold
