"""Keep freed CPU memory in the process for reuse: a C-allocator setting that speeds up CPU training.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc's defaults hand large blocks back to the
operating system as soon as they are freed (blocks above the mmap threshold, at most 32 MiB, get their own
``mmap``; a free heap top above the trim threshold is returned), so every training step faults its activations'
pages in again, and zero-fills them in the kernel. On this project's 2-core VM an allocation + fill of 32 MiB took
15.0 ms with the defaults and 2.3 ms with freed memory kept, and one training step of resnet26 / sasa_resnet26
(batch 8, 128x128, 1 thread) got ~14% / ~9% faster (BENCHMARKS.md). PyTorch's CPU tuning guide reaches the same
end by preloading jemalloc or tcmalloc; this needs no extra library.

``keep_freed_memory()`` sets glibc's ``M_MMAP_MAX`` to 0 (large blocks come from the heap too) and
``M_TRIM_THRESHOLD`` to its maximum (the heap is never trimmed) through ``mallopt``, the equivalent of
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` set before start-up. The cost: the process keeps the memory of
its peak (which a training loop reaches every step anyway). ``SASA_CPU_MALLOC=default`` leaves the allocator
alone. The engines (``sasa train`` / ``eval`` / ``detect-*`` / ``bench`` on CPU) call it and record its answer.

Status: complete; glibc only (other C libraries are left as they are and say so).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
_state: str | None = None


def keep_freed_memory() -> str:
    """Turn off glibc's returning of freed memory to the OS (once per process); returns what was done, for records:
    ``"kept (glibc mallopt)"``, ``"default (SASA_CPU_MALLOC=default)"`` or ``"default (<why>)"``."""
    global _state
    if _state is not None:
        return _state
    if os.environ.get("SASA_CPU_MALLOC", "").strip().lower() == "default":
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
