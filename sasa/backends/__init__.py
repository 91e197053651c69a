"""Backend registry for the local attention op.

Each backend is a module-level object with a ``name``, a ``can_run(q, ...) -> str | None`` predicate that returns
``None`` when it can run or a human-readable reason when it cannot, and an ``apply(...)`` that computes the op with
autograd support. ``sasa.functional`` picks one and dispatches; nothing else should import backends directly.

Status: ``reference`` (oracle), ``shifted`` (lean CPU/GPU path) and ``inductor`` (``shifted`` fused by
``torch.compile``, CPU) always present; ``triton`` registered when the Triton module imports. ``force(name)``
pins every op call inside a ``with`` block to one backend, for passes that need shapes or one forward but not
speed (counting FLOPs, listing or drawing attention layers), so that they never wait for a compile.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Backend:
    """A way to compute ``local_attention_2d``.

    Attributes:
        name: the string users pass as ``backend=``.
        apply: ``(q, k, v, rel_rows, rel_cols, kernel_size, padding, scale) -> out``, differentiable.
        can_run: returns ``None`` if the backend handles these tensors, else the reason it does not.
        priority: higher wins when ``backend=None`` (per device type, see ``default_order``).
    """

    name: str
    apply: Callable
    can_run: Callable[..., str | None]
    priority: dict


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def get(name: str) -> Backend:
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"backend={name!r} is unknown; valid backends: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def all_backends() -> dict[str, Backend]:
    _load_all()
    return dict(_REGISTRY)


_LOADED = False


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import inductor, reference, shifted  # noqa: F401  (registration side effect)

    try:
        from . import triton_backend  # noqa: F401
    except ImportError:  # Triton not installed: the backend simply is not offered
        pass


_FORCED: ContextVar[str | None] = ContextVar("sasa_forced_backend", default=None)


@contextlib.contextmanager
def force(name: str) -> Iterator[None]:
    """Run every ``local_attention_2d`` call inside the block with backend ``name``, whatever the call's
    ``backend=``, ``SASA_BACKEND`` or the automatic choice would pick (all backends compute the same op)."""
    get(name)  # an unknown name fails here, not at the first call inside the block
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def forced() -> str | None:
    """The backend ``force`` pins in this context, or None."""
    return _FORCED.get()


def env_default() -> str | None:
    """The ``SASA_BACKEND`` environment override, read in one place."""
    value = os.environ.get("SASA_BACKEND", "").strip()
    return value or None


def default_for(q: torch.Tensor, **kwargs) -> Backend:
    """The highest-priority backend that can run on ``q``'s device and dtype."""
    _load_all()
    device_type = q.device.type
    candidates = sorted(_REGISTRY.values(), key=lambda b: -b.priority.get(device_type, -1))
    for backend in candidates:
        if backend.priority.get(device_type, -1) < 0:
            continue
        if backend.can_run(q, **kwargs) is None:
            return backend
    return _REGISTRY["reference"]
