"""One entry point for one process or many: ``init_distributed()`` reads what ``torchrun`` sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); without it, a world of size 1 and no process group.
NCCL on CUDA, gloo otherwise (CPU DDP, what the tests use). The reductions are no-ops in a world of size 1."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global ``rank`` of ``world_size``, ``local_rank`` on its node (picks the GPU), the
    ``device`` it computes on, and ``is_main`` (rank 0: the only process that writes files and prints)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(device: str | None = None, *, timeout_s: float = 1800.0) -> DistInfo:
    """Start the process group when launched by ``torchrun`` and pick this process's device: ``"cpu"``,
    ``"cuda"`` (``cuda:LOCAL_RANK`` under torchrun) or ``None`` for CUDA when available."""
    if device not in (None, "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ValueError(f"device must be 'cpu', 'cuda' or None, got {device!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but torch.cuda.is_available() is False")
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if str(device) == "cuda":
        dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, is_main=rank == 0)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (a new tensor; the input is untouched)."""
    out = tensor.detach().clone()
    if is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all ranks (a new tensor)."""
    out = reduce_sum(tensor)
    return out / dist.get_world_size() if is_initialized() else out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (e.g. a run directory name chosen by rank 0)."""
    if not (is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for all ranks (no-op without a process group)."""
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one was started."""
    if is_initialized():
        dist.destroy_process_group()


def parallelize(module: torch.nn.Module, dist_info: DistInfo, *, compile: bool = False) -> torch.nn.Module:
    """What the forward pass runs: ``module``, ``torch.compile``'d if asked, DDP-wrapped in a world above 1."""
    model = torch.compile(module) if compile else module
    if dist_info.distributed:
        device = dist_info.device
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return model
