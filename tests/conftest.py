"""Session-wide test settings.

Without a GPU the Triton kernels run in the interpreter, which must be
switched on before any `@triton.jit` function is imported, so it is set here,
at the very top of the first conftest pytest loads.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="gpu test: no CUDA device on this machine "
                                   "(torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
