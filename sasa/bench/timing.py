"""Timing, peak memory and the environment record every benchmark row carries.

- Time: CUDA events around each repeat on GPU (after a synchronize), ``time.perf_counter`` on CPU; warm-up calls
  first; the median, min, max and interquartile range of the repeats, in milliseconds. On CPU the process's CPU
  time per call (all threads, ``cpu_median``, ``cpu_min``) and the load average too: on a shared machine wall time
  counts other jobs, CPU time much less.
- Peak memory (``peak_mb``): the highest tensor memory allocated *during* one call above what was allocated
  before it (parameters, optimizer state and inputs are not counted). On GPU from ``torch.cuda.max_memory_allocated``;
  on CPU from ``torch.profiler``'s allocation events, summed in time order. Tensors only, not allocator caches.
- The profiler's native stderr chatter (``PROFILER_NOISE``) is filtered out while it runs (``quiet_profiler``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch

from ..process import allocator_state

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated during the call minus memory_allocated before it",
    "cpu": "peak of tensor allocations during the call (torch.profiler profile_memory events), above the start",
}


PROFILER_NOISE = re.compile(r"^USDT:.*profiler_(start|stop)|gpuGetDeviceCount failed|"
                            r"allocated before the profiling started")


@contextlib.contextmanager
def quiet_profiler() -> Iterator[None]:
    """Drop ``PROFILER_NOISE`` lines that native code writes to stderr (file descriptor 2) inside the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not PROFILER_NOISE.search(line)))


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> dict:
    """Call ``fn`` ``warmup`` times, then time ``repeats`` calls; statistics in ms."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        cpu = []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
        stats = summarize(times)
        stats["cpu_median"], stats["cpu_min"] = statistics.median(cpu), min(cpu)
        return stats
    return summarize(times)


def summarize(times: list[float]) -> dict:
    ordered = sorted(times)
    q = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "q1": q[0], "q3": q[2],
            "repeats": len(ordered)}


def peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak tensor memory (MiB) allocated during one call of ``fn`` above what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


def top_ops(fn: Callable[[], object], device: torch.device, n: int) -> list[dict]:
    """The ``n`` operators with the most self time (device time on GPU) in one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with quiet_profiler():
        with profile(activities=activities) as prof:
            fn()
            sync(device)
        averages = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(averages, key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return [{"op": e.key, "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total, "calls": e.count}
            for e in events[:n]]


def git_commit() -> dict:
    """The commit of the source tree the package runs from, and whether that tree has local changes."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], check=False, cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit or "unknown", "dirty": dirty if commit else None}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def environment(device: torch.device, *, dtype: str, channels_last: bool, command: str) -> dict:
    return {
        "command": command,
        **git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "dtype": dtype,
        "channels_last": channels_last,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # other jobs on the machine
        "memory": MEMORY_METHOD[device.type],
        "cpu_malloc": allocator_state(),
    }
