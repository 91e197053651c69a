"""Kernels that verify themselves: a per-process verdict per Triton kernel configuration.

The ``triton`` backend's kernels are the CUDA default, and what the interpreter tests cannot see (alignment hints,
vector loads, the compiler itself) would otherwise first show as a bad training run. So the first time a call
needs a configuration -- a tuple of ``(name, value)`` pairs naming everything that selects a compiled variant: the
op, device, dtypes, head_dim, kernel size, padding, tiles, heads per program, vector width -- ``verified(key,
check)`` runs ``check``: the backend's own function that launches the same configuration on a small input, forward
and every gradient, and compares with the ``reference`` backend computed in float32 (``compare``, tolerances per
dtype in ``TOLERANCES``). The verdict is kept for the life of the process; later calls cost a dict lookup.

A configuration that fails warns once, naming it and what differed, and ``verified`` returns False from then on:
the backend runs ``shifted`` for it. ``SASA_KERNEL_CHECK`` (``sasa.settings.kernel_check``): ``warn`` (default),
``error`` (raise instead of falling back, at every call of a failed configuration), ``off`` (no check: always True).

Contract of ``check``: no arguments; returns None when the kernels agree, else a short description of the first
difference; an exception it raises counts as a failure (its text is the description). It runs in a worker thread,
so the caller's thread-local state cannot reach it: no autograd, inference or autocast mode, no torch.compile fake
or dispatch mode, no custom-op dispatch below autograd (the window op checks from inside its custom op). Calls the
check itself makes pass unchecked (a thread-local flag), so it cannot recurse; a lock makes other threads wait for a
verdict being computed. ``check`` draws its inputs from its own ``torch.Generator``: the program's random streams
are untouched. Nothing is checked (True, no verdict kept) while torch.compile traces or while the current CUDA
stream is capturing a graph (a check would allocate and synchronise); the configuration is checked at its first
call outside them.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch

from .. import settings

# (rtol, atol) per dtype: a result passes where |got - expected| <= rtol * |expected| + atol * max |expected| (atol
# relative to the tensor's largest value, which sets the scale of the sums behind every element), against a float32
# reference computed from the same, already rounded, inputs. fp32 leaves only the order of the fp32 sums; bf16 / fp16
# add the rounding of stored results (8 / 11 significant bits; the backward reads the rounded output), and in the
# stem TF32 dot inputs (11 bits).
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}

Key = tuple  # ((name, value), ...)

_VERDICTS: dict[Key, str | None] = {}  # None: passed; else what differed
_LOCK = threading.Lock()
_LOCAL = threading.local()
_UNSET = object()


class KernelCheckError(RuntimeError):
    """A kernel configuration failed its check under ``SASA_KERNEL_CHECK=error``."""


def describe(key: Key) -> str:
    """``name=value, ...`` of a configuration key (dtypes without their ``torch.``)."""
    return ", ".join(f"{name}={value}".replace("torch.", "") for name, value in key)


def _skip(device: torch.device | None) -> bool:
    if torch.compiler.is_compiling():
        return True
    return device is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def verified(key: Key, check: Callable[[], str | None], device: torch.device | None = None) -> bool:
    """True when the kernels may run this configuration (passed, checking off or skipped, or a call from inside a
    check); False when it failed (the caller runs ``shifted``). ``device``: the tensors', for the capture test."""
    mode = settings.kernel_check()
    if mode == "off" or getattr(_LOCAL, "inside", False):
        return True
    verdict = _VERDICTS.get(key, _UNSET)
    if verdict is _UNSET:
        if _skip(device):
            return True
        with _LOCK:
            verdict = _VERDICTS.get(key, _UNSET)
            if verdict is _UNSET:
                verdict = _VERDICTS[key] = _run(check)
                if verdict is not None and mode == "warn":
                    warnings.warn(f"sasa: the Triton kernels failed their self-check for {describe(key)}: {verdict}; "
                                  "this configuration runs the 'shifted' backend instead (SASA_KERNEL_CHECK=error "
                                  "raises, =off skips the check)", RuntimeWarning, stacklevel=3)
    if verdict is None:
        return True
    if mode == "error":
        raise KernelCheckError(f"sasa: the Triton kernels failed their self-check for {describe(key)}: {verdict} "
                               "(SASA_KERNEL_CHECK=error)")
    return False


def _run(check: Callable[[], str | None]) -> str | None:
    """``check()`` in a fresh thread (default thread-local state), exceptions as failures."""
    result: list = []

    def work():
        _LOCAL.inside = True
        try:
            result.append(check())
        except Exception as e:  # a kernel that does not compile or launch fails its check like a wrong one
            result.append(f"{type(e).__name__}: {e}")

    worker = threading.Thread(target=work, name="sasa-kernel-check", daemon=True)
    worker.start()
    worker.join()
    return result[0]


def verdicts() -> dict[Key, str | None]:
    """A copy of this process's verdicts: ``{key: None (passed) or what differed}``."""
    with _LOCK:
        return dict(_VERDICTS)


def clear() -> None:
    """Forget every verdict (tests; the next call of each configuration checks again)."""
    with _LOCK:
        _VERDICTS.clear()


def tolerance(*dtypes: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` of a result that passed through each of ``dtypes`` (the loosest of theirs)."""
    found = [TOLERANCES.get(d, TOLERANCES[torch.float32]) for d in dtypes]
    return max(r for r, _ in found), max(a for _, a in found)


def compare(pairs: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]], *,
            precision: torch.dtype = torch.float32) -> str | None:
    """None when every ``name: (got, expected)`` pair agrees within ``tolerance(got.dtype, precision)`` (the rule
    above ``TOLERANCES``), else the first that does not, with its largest error. ``expected`` is float32; a pair with
    ``expected`` None must have ``got`` None or all zeros. ``precision``: the kernels' input or computing dtype, when
    coarser than a result's."""
    for name, (got, want) in pairs.items():
        if want is None:
            if got is not None and bool(got.abs().any()):
                return f"{name} should be zero"
            continue
        if got is None or got.shape != want.shape:
            return f"{name} has shape {None if got is None else tuple(got.shape)}, expected {tuple(want.shape)}"
        rtol, atol = tolerance(got.dtype, precision)
        if want.numel() == 0:
            continue
        err = (got.float() - want).abs().nan_to_num(float("inf"))  # NaN fails too
        if bool((err > rtol * want.abs() + atol * want.abs().max()).any()):
            return (f"{name} differs from the reference by up to {err.max().item():.3g} (largest |reference| "
                    f"{want.abs().max().item():.3g}, rtol={rtol}, atol={atol} of it, {got.dtype})")
    return None
