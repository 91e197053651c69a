"""The environment knobs, read here and nowhere else (one function per knob, read at each call).

======================  ==================================  ==========================================================
variable                function                            effect
======================  ==================================  ==========================================================
``SASA_BACKEND``        ``backend("window")``               backend of ``local_attention_2d`` when the call names none
``SASA_STEM_BACKEND``   ``backend("stem")``                 backend of the attention stem's op (``stem_attention``)
``SASA_CPU_MALLOC``     ``cpu_malloc_default()``            ``default``: the commands leave glibc's allocator alone
``SASA_NO_DOWNLOAD``    ``no_download()``                   ``1``: datasets are never downloaded
``TRITON_INTERPRET``    ``triton_interpret()``              ``1``: the Triton kernels run in Triton's interpreter
``SASA_KERNEL_CHECK``   ``kernel_check()``                  ``warn`` (default): a Triton kernel configuration that
                                                            fails its first-use check warns and runs ``shifted``;
                                                            ``error``: raises; ``off``: no check
======================  ==================================  ==========================================================

Backend names are those of ``sasa.backends`` (one vocabulary for both ops); an empty variable means "not set".
"""

from __future__ import annotations

import os

BACKEND_VARIABLES = {"window": "SASA_BACKEND", "stem": "SASA_STEM_BACKEND"}


def _get(name: str) -> str:
    return os.environ.get(name, "").strip()


def backend(op: str) -> str | None:
    """The backend name the environment sets for ``op`` (``"window"`` or ``"stem"``), or None."""
    return _get(BACKEND_VARIABLES[op]).lower() or None


def cpu_malloc_default() -> bool:
    """``SASA_CPU_MALLOC=default``: leave the C allocator's settings alone."""
    return _get("SASA_CPU_MALLOC").lower() == "default"


def no_download() -> bool:
    """``SASA_NO_DOWNLOAD`` set to anything but ``0``: never download a dataset."""
    return _get("SASA_NO_DOWNLOAD") not in ("", "0")


def triton_interpret() -> bool:
    """``TRITON_INTERPRET`` is on: Triton kernels run interpreted (on CPU tensors too; tests only)."""
    return _get("TRITON_INTERPRET").lower() in ("1", "true", "yes", "on")


KERNEL_CHECK_MODES = ("off", "warn", "error")


def kernel_check() -> str:
    """``SASA_KERNEL_CHECK``: ``"warn"`` (unset), ``"error"`` or ``"off"`` (``sasa.backends.selfcheck``)."""
    mode = _get("SASA_KERNEL_CHECK").lower() or "warn"
    if mode not in KERNEL_CHECK_MODES:
        raise ValueError(f"SASA_KERNEL_CHECK={mode!r} is not valid; expected one of {KERNEL_CHECK_MODES}")
    return mode
