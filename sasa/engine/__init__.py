"""Training engine: the pieces a training script wires together (checkpoints, distributed, metrics, signals,
config, optimiser, EMA) and the classification loops that take them as objects.

Status: checkpoint, distributed, metrics and signals primitives complete; classification engine in progress.
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
