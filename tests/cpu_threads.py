"""Fixture `single_torch_thread`: run a test module's tiny models on one CPU thread.

Tiny matmuls gain nothing from threads, and OpenMP workers spinning on the few
shared cores of CI make them ten times slower. Use it module-wide with
`pytestmark = pytest.mark.usefixtures("single_torch_thread")` after importing it.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def single_torch_thread():
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)
