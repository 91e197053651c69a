"""Test-session setup, run before any test module is imported.

Triton's interpreter (how the ``triton`` backend is tested without a GPU) only works when ``triton`` is *first*
imported with ``TRITON_INTERPRET=1``: its standard-library helpers (the combine functions behind ``tl.sum``, ...) are
decorated at import time. torchvision imports triton, so on a machine without CUDA the flag is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
