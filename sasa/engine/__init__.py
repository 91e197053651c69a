"""Training engine: the one training loop (``trainer``) every task plugs into, and the pieces a task's wiring uses:
``distributed`` (torchrun/DDP), ``rundir`` (run directories and resume), ``config`` (YAML + flags), ``optim``,
``ema``, ``syncbn``, ``metrics``, ``signals``, ``environment``. ``classify`` is the classification task, ``train``
and ``evaluate`` are ``sasa train`` and ``sasa eval``. ``sasa.detection`` imports this package, never the reverse."""

from .distributed import DistInfo, all_reduce_mean, barrier, cleanup, init_distributed, reduce_sum
from .metrics import MetricsLogger, plot_metrics
from .signals import GracefulStop

__all__ = ["DistInfo", "GracefulStop", "MetricsLogger", "all_reduce_mean", "barrier", "cleanup", "init_distributed",
           "plot_metrics", "reduce_sum"]
