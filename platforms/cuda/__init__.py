"""CUDA platform: NVIDIA GPUs, PagedAttention kernels in CUDA C++ (csrc/).

The kernels are JIT-built on the first kernel call (build.py); importing this
module or getting the backend needs no GPU and no nvcc.
"""

from __future__ import annotations

import importlib.util

import torch

from platforms.interface import AttentionBackend, Platform


class CudaPlatform(Platform):
    name = "cuda"
    device = "cuda"
    dist_backend = "nccl"

    def is_available(self) -> bool:
        # ROCm builds of torch also answer torch.cuda.is_available(); they
        # have torch.version.hip instead of torch.version.cuda.
        return bool(torch.version.cuda) and torch.cuda.is_available()

    def unavailable_reason(self) -> str:
        if not torch.version.cuda:
            return (f"platform 'cuda' needs a CUDA build of torch; torch {torch.__version__} "
                    "has no CUDA support")
        if not torch.cuda.is_available():
            return "platform 'cuda' found no NVIDIA GPU (torch.cuda.is_available() is False)"
        return ""

    @property
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        # bfloat16 arithmetic is native from Ampere (sm80) on.
        if self.is_available() and torch.cuda.get_device_capability() < (8, 0):
            return (torch.float32, torch.float16)
        return (torch.float32, torch.float16, torch.bfloat16)

    def memory_info(self) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info()
        return total, free

    def backend_names(self) -> list[str]:
        # The Triton kernel (the ROCm path's, portable to NVIDIA) measured
        # faster than the CUDA C++ one on the H100 for both decode and prefill
        # (benchmarks/RESULTS.md), so it is the default when triton is there.
        if importlib.util.find_spec("triton") is not None:
            return ["triton", "cuda"]
        return ["cuda"]

    def _make_backend(self, name: str) -> AttentionBackend:
        if name == "triton":
            from platforms.rocm.backend import TritonAttentionBackend
            return TritonAttentionBackend()
        from platforms.cuda.backend import CudaAttentionBackend
        return CudaAttentionBackend()
