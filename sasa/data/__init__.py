"""Datasets and input pipelines: Fashion-MNIST (the default), ImageNet-layout folders, CIFAR-10/100, synthetic."""

from .build import DATASETS, DataBundle, build_data, check_data_config
from .loader import Bad, Batch, ResumableDistributedSampler, ShardSampler, TransformedDataset, collate_skip_bad

__all__ = [
    "DATASETS",
    "Bad",
    "Batch",
    "DataBundle",
    "ResumableDistributedSampler",
    "ShardSampler",
    "TransformedDataset",
    "build_data",
    "check_data_config",
    "collate_skip_bad",
]
