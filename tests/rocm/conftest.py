"""Triton kernels of the rocm platform: interpreter on CPU, compiled on a GPU.

TRITON_INTERPRET must be set before any @triton.jit function is imported, so
it is set here first thing (the session conftest does the same; this keeps
the folder right when run on its own). With a CUDA device (NVIDIA, or AMD
through a ROCm build of torch) the kernels compile and run on it instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
