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

# Under pytest-xdist (`make test` runs 2 workers on 2 cores) each worker computes on one thread, so that the workers
# do not oversubscribe the cores; the processes the tests start (CLI runs, torchrun) set their own threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


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


# ------------------------------------------------------------------------------------------------ test tiers
# `pytest -m "not slow"` is the quick tier (about a minute on 2 cores); `make test` runs everything. Whole tests that
# start processes, train end to end, compile for the GPU or run long in Triton's interpreter carry
# @pytest.mark.slow where they are defined. Parametrised cases are marked here, by node id: the cases below are slow
# except the quick representatives, which keep every component in the quick tier.
SLOW_CASES = (
    # Triton's interpreter runs one Python step per tile and window offset: seconds to a minute per case
    "tests/test_triton.py::test_matches_reference_fp32[[]*]",
    "tests/test_triton.py::test_stem_kernels_match_reference[[]*]",
    # every `inductor` case compiles its own graphs on an empty Inductor cache (seconds to tens of seconds each);
    # test_default_backend_and_env_override keeps the compiled default quick-tested against the reference
    "tests/test_*.py::*[[]*inductor*]",
    # float64 gradchecks, detection training runs, model builds per config: seconds each, one kept quick
    "tests/test_functional.py::test_gradcheck_float64[[]*]",
    "tests/test_detection.py::test_tiny_rows_train_and_eval[[]*]",
    "tests/test_engine.py::test_imagenet_configs_follow_the_paper[[]*]",
    # exports through torch.export / ONNX and the CLI runs that write them: tens of seconds to minutes each
    "tests/test_export.py::test_cli_writes_a_checked_file[[]*]",
    "tests/test_export.py::test_onnx_dynamic_batch_runs_in_onnxruntime",
    "tests/test_export.py::test_onnx_static_batch_is_fixed",
    # fresh Python processes importing torch (tests/test_tiers.py has no pytest import of its own)
    "tests/test_tiers.py::test_core_runs_without_the_applications_dependencies",
    "tests/test_tiers.py::test_cli_names_the_missing_extra",
)
QUICK_REPRESENTATIVES = (
    "tests/test_triton.py::test_matches_reference_fp32[qr_only_mask_rows]",
    "tests/test_triton.py::test_matches_reference_fp32[no_tables_mask_odd_d]",
    "tests/test_triton.py::test_matches_reference_fp32[hb4_basic]",
    "tests/test_triton.py::test_stem_kernels_match_reference[spatial-1-2-3-shape2]",
    "tests/test_functional.py::test_gradcheck_float64[mask-shifted]",
    "tests/test_detection.py::test_tiny_rows_train_and_eval[attention/full-attention]",
    "tests/test_engine.py::test_imagenet_configs_follow_the_paper[imagenet_sasa_resnet26]",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark ``SLOW_CASES`` slow (``QUICK_REPRESENTATIVES`` excepted), before ``-m`` selects; when whole files are
    collected, fail on a representative that no longer exists, so no component silently leaves the quick tier."""
    from fnmatch import fnmatchcase

    ids = {item.nodeid for item in items}
    for item in items:
        if item.nodeid not in QUICK_REPRESENTATIVES and any(fnmatchcase(item.nodeid, p) for p in SLOW_CASES):
            item.add_marker(pytest.mark.slow)
    whole_files = not config.option.keyword and not any("::" in str(a) for a in config.args)
    files = {item.nodeid.split("::")[0] for item in items}
    missing = [r for r in QUICK_REPRESENTATIVES if r.split("::")[0] in files and r not in ids]
    if whole_files and missing:
        raise pytest.UsageError(f"tests/conftest.py: quick representatives not collected (renamed?): {missing}")
