"""Process-wide settings a command applies once, at its entry (``sasa train``, ``eval``, ``detect-*``, ``bench``).

``configure_process(device, threads=...)`` sets torch's CPU threads and, on CPU, ``keep_freed_memory()``: glibc
otherwise hands every large freed block back to the OS, so each training step faults its activations' pages in
again. It sets glibc's ``M_MMAP_MAX`` to 0 and ``M_TRIM_THRESHOLD`` to its maximum through ``mallopt`` (as
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` would); the process keeps the memory of its peak.
``SASA_CPU_MALLOC=default`` leaves the allocator alone; C libraries other than glibc are left as they are."""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

from .settings import cpu_malloc_default

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
_state: str | None = None


def keep_freed_memory() -> str:
    """Turn off glibc's returning of freed memory to the OS (once per process); returns what was done, for records:
    ``"kept (glibc mallopt)"``, ``"default (SASA_CPU_MALLOC=default)"`` or ``"default (<why>)"``."""
    global _state
    if _state is not None:
        return _state
    if cpu_malloc_default():
        _state = "default (SASA_CPU_MALLOC=default)"
        return _state
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it; musl's mallopt ignores these parameters
    except (OSError, AttributeError):
        _state = "default (not glibc)"
        return _state
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _state = "kept (glibc mallopt)" if ok else "default (mallopt refused)"
    return _state


def allocator_state() -> str:
    """What ``keep_freed_memory`` did in this process, for records (``"default (not changed)"`` if not called)."""
    return _state or "default (not changed)"


def configure_process(device: torch.device | str, *, threads: int | None = None) -> None:
    """Apply the process-wide settings of a command: ``threads`` torch CPU threads (``None``: torch's choice) and,
    when ``device`` is the CPU, ``keep_freed_memory()`` (recorded by ``allocator_state`` in env.json)."""
    if threads:
        torch.set_num_threads(threads)
    if torch.device(device).type == "cpu":
        keep_freed_memory()
