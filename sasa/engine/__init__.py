"""Training engine: the pieces a training script wires together (checkpoints, distributed, metrics, signals,
config, optimiser, EMA) and the classification loops that take them as objects.

Files: ``checkpoint`` (atomic, weights_only), ``distributed`` (torchrun/DDP), ``metrics`` (metrics.jsonl + plots),
``signals`` (SIGINT/SIGTERM -> flag), ``config`` (YAML + flags), ``optim`` (no-decay groups, warm-up + cosine),
``ema``, ``syncbn`` (CPU-capable SyncBN), ``classify`` (the loops), ``runner`` (wiring for ``sasa train|eval``).

Status: complete; tested on CPU (1 and 2 gloo processes). The GPU paths (NCCL, bf16 autocast, channels-last,
torch.compile) are wired but were not exercised on a GPU in this package's tests.
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .distributed import DistInfo, all_reduce_mean, barrier, cleanup, init_distributed, reduce_sum
from .metrics import MetricsLogger, plot_metrics
from .signals import GracefulStop

__all__ = [
    "CheckpointError",
    "DistInfo",
    "GracefulStop",
    "MetricsLogger",
    "all_reduce_mean",
    "barrier",
    "cleanup",
    "init_distributed",
    "load_checkpoint",
    "plot_metrics",
    "reduce_sum",
    "save_checkpoint",
]
