"""Training engine: the pieces a training script wires together (checkpoints, distributed, metrics, signals,
config, optimiser, EMA), the one training loop (``trainer``) that every task plugs into, and classification.

Files: ``checkpoint`` (atomic, weights_only), ``distributed`` (torchrun/DDP), ``metrics`` (metrics.jsonl + plots),
``signals`` (SIGINT/SIGTERM -> flag), ``config`` (YAML + flags), ``optim`` (no-decay groups, warm-up + cosine),
``ema``, ``syncbn`` (CPU-capable SyncBN), ``trainer`` (the loop; tasks plug in), ``rundir`` (run directories and
resume, for every task), ``classify`` (the classification task), ``runner`` (wiring for ``sasa train|eval``).
Detection (``sasa.detection``) imports this package; nothing here imports detection.

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
