"""Backend registry: one chooser for every op.

Two ops dispatch here: ``"window"`` (``sasa.local_attention_2d``) and ``"stem"`` (``sasa.functional.stem_attention``,
the attention stem's block attention). Each backend module registers its implementations per op, under one
vocabulary (``BACKEND_NAMES``):

=============  ================================================  ================================================
name           ``window`` op                                     ``stem`` op
=============  ================================================  ================================================
``reference``  unfolded windows, autograd: the oracle            blocks, autograd: the oracle
``shifted``    eager PyTorch, shifted slices, own backward       eager PyTorch, reassociated, recomputing backward
``inductor``   ``shifted``'s maths compiled (CPU default)        --
``triton``     fused kernels (CUDA default)                      two kernels (CUDA default)
=============  ================================================  ================================================

Choice, per call (``choose``): inside ``force(name)`` every op that has ``name`` runs it; else the call's
``backend=``; else the environment (``SASA_BACKEND`` for the window op, ``SASA_STEM_BACKEND`` for the stem, read by
``sasa.settings``); else, on the tensors' device, the highest ``priority`` whose ``can_run`` accepts them. A named
backend that cannot run raises with ``can_run``'s reason; an unknown name raises naming the valid ones (the stem's old
name ``torch`` says to write ``shifted``). ``force`` is for passes that need shapes or one forward but not speed
(counting FLOPs, listing or drawing attention layers), so that they never wait for a compile.
``triton`` is registered when its module imports; its kernels check themselves against ``reference`` at a
configuration's first use and fall back to ``shifted`` if they disagree (``selfcheck.py``, ``SASA_KERNEL_CHECK``).
Nothing outside this package imports a backend module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .. import settings
from .portable import window_attention_portable  # noqa: F401  (public through sasa.functional)

OPS = ("window", "stem")
BACKEND_NAMES = ("reference", "shifted", "inductor", "triton")
_RENAMED = {"torch": "shifted"}  # the stem's old SASA_STEM_BACKEND / AttentionStem(backend=) spelling


@dataclass(frozen=True)
class Backend:
    """One op's implementation.

    Attributes:
        name: the string users pass as ``backend=`` (one of ``BACKEND_NAMES``).
        op: ``"window"`` or ``"stem"``.
        apply: the op, differentiable, called with the functional op's arguments.
        can_run: ``(x, **kwargs) -> None`` if the backend handles these tensors, else the reason it does not.
        priority: per device type, higher wins when nothing names a backend; absent: never chosen automatically.
    """

    name: str
    op: str
    apply: Callable
    can_run: Callable[..., str | None]
    priority: dict


_REGISTRY: dict[tuple[str, str], Backend] = {}


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.op, backend.name] = backend
    return backend


def all_backends(op: str = "window") -> dict[str, Backend]:
    """``{name: Backend}`` of ``op``."""
    _load_all()
    return {name: b for (o, name), b in _REGISTRY.items() if o == op}


def get(name: str, op: str = "window") -> Backend:
    """The backend ``name`` of ``op``; an unknown name raises naming the valid ones."""
    found = all_backends(op).get(name)
    if found is None:
        hint = f" ({name!r} is now called {_RENAMED[name]!r})" if name in _RENAMED else ""
        valid = sorted(all_backends(op))
        raise ValueError(f"backend={name!r} is unknown for the {op} op{hint}; valid backends: {valid}")
    return found


_LOADED = False


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import inductor, reference, shifted, stem  # noqa: F401  (registration side effect)

    try:
        from . import triton_backend  # noqa: F401
    except ImportError:  # Triton not installed: the backend simply is not offered
        pass


# What ``force`` and ``record`` set, as plain module state rather than ContextVars: torch.compile traces a dict
# lookup, but not ``ContextVar.get`` before torch 2.14 (a graph break, an error under ``fullgraph=True``).
_ACTIVE: dict = {"forced": None, "record": None}


@contextlib.contextmanager
def _set(key: str, value) -> Iterator[None]:
    previous, _ACTIVE[key] = _ACTIVE[key], value
    try:
        yield
    finally:
        _ACTIVE[key] = previous


@contextlib.contextmanager
def force(name: str) -> Iterator[None]:
    """Run every op call inside the block with backend ``name`` where the op has it, whatever the call's
    ``backend=``, the environment or the automatic choice would pick (every backend of an op computes the same)."""
    _load_all()
    if not any(n == name for _, n in _REGISTRY):  # an unknown name fails here, not at the first call inside
        get(name)
    with _set("forced", name):
        yield


@contextlib.contextmanager
def record() -> Iterator[set[tuple[str, str]]]:
    """Collect the ``(op, name)`` of every backend the calls inside the block run (benchmarks report them)."""
    with _set("record", used := set()):
        yield used


def choose(op: str, x: torch.Tensor, backend: str | None = None, **kwargs) -> Backend:
    """The backend ``op`` runs on ``x`` (module docstring); ``kwargs`` go to ``can_run``."""
    forced = _ACTIVE["forced"]
    name = forced if forced in all_backends(op) else backend or settings.backend(op)
    if name is not None:
        chosen = get(name, op)
        reason = chosen.can_run(x, **kwargs)
        if reason is not None:
            raise ValueError(f"backend={name!r} cannot run here: {reason} (the {op} op)")
    else:
        ok = (b for b in ranked(op, x.device) if b.can_run(x, **kwargs) is None)
        chosen = next(ok, None) or get("reference", op)
    if (used := _ACTIVE["record"]) is not None:
        used.add((op, chosen.name))
    return chosen


def ranked(op: str, device: torch.device) -> list[Backend]:
    """``op``'s backends that may be chosen automatically on ``device``, highest priority first (where none can
    run, ``reference`` does)."""
    found = [b for b in all_backends(op).values() if device.type in b.priority]
    return sorted(found, key=lambda b: -b.priority[device.type])


def attention_probs(q, k, rel_rows, rel_cols, kernel_size, padding, scale) -> torch.Tensor:
    """The window op's softmax weights ``(B, H, W, heads, k, k)``, computed by ``reference`` (the fast backends
    never materialise them); arguments as ``sasa.functional.attention_probs``, already checked."""
    from .reference import attention_probs

    return attention_probs(q, k, rel_rows, rel_cols, kernel_size, padding, scale)
