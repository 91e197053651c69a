"""What a result was produced with: versions, device, threads, world size, git commit (``env.json`` of a run)."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch


def git_commit(path: str | os.PathLike | None = None) -> dict:
    """``{"commit": sha or "unknown", "dirty": bool or None}`` for the repository holding ``path`` (the package)."""
    where = Path(path or Path(__file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10,
                             check=False)
        if sha.returncode != 0:
            return {"commit": "unknown", "dirty": None}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10, check=False)
        return {"commit": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def describe_device(device: torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3"`` or ``"cpu (2 cores, 2 torch threads)"``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def attention_backend(device: torch.device) -> str:
    """The backend layers without ``backend=`` run on ``device``, e.g. ``"inductor (auto)"`` or ``"shifted
    (SASA_BACKEND)"`` (backends differ in the last bits, so a run records which one it had)."""
    from ..functional import available_backends
    from ..settings import backend

    forced = backend("window")
    if forced:
        return f"{forced} (SASA_BACKEND)"
    names = available_backends(device)
    return f"{names[0]} (auto)" if names else "none"


def collect_environment(device: torch.device, world_size: int = 1) -> dict:
    """A JSON-serialisable record of the software and hardware of this run."""
    import torchvision

    from ..process import allocator_state
    from ..version import __version__

    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "sasa": __version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": describe_device(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_malloc": allocator_state(),
        "attention_backend": attention_backend(device),
        "world_size": world_size,
        **git_commit(),
    }
