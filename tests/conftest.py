"""Test-session setup, run before any test module is imported.

Triton's interpreter (how the ``triton`` backend is tested without a GPU) only works when ``triton`` is *first*
imported with ``TRITON_INTERPRET=1``: its standard-library helpers (the combine functions behind ``tl.sum``, ...) are
decorated at import time. torchvision imports triton, so on a machine without CUDA the flag is set here, first.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The CPU default, ``inductor``, compiles its loops with torch.compile on first use (seconds per variant and
# process, and the CLI tests start many processes): the suite runs models on ``shifted`` (the same maths, eager) and
# tests ``inductor`` wherever a test names it (every op test of tests/test_functional.py, the bench's backend rows)
# and the default choice itself (test_default_backend_and_env_override, which unsets this).
os.environ.setdefault("SASA_BACKEND", "shifted")


def _inductor_fallbacks() -> int:
    inductor = sys.modules.get("sasa.backends.inductor")
    return sum(inductor.calls()["fallback"].values()) if inductor is not None else 0


@pytest.fixture(autouse=True)
def _inductor_never_falls_back():
    """Any test during which the ``inductor`` backend ran its eager fallback (a failed compile switches the process
    to ``shifted``'s core with only a warning) fails, so that no test passes on the fallback instead of the compiled
    loops. The test that breaks the compile on purpose swaps the counters with monkeypatch, undone before this."""
    before = _inductor_fallbacks()
    yield
    if _inductor_fallbacks() > before:
        inductor = sys.modules["sasa.backends.inductor"]
        pytest.fail(f"the inductor backend fell back to eager during this test: {inductor.failure()}")
