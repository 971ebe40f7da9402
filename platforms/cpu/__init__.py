"""CPU platform: the reference oracle and a fast vectorized backend.

`dtype="auto"` loads in bfloat16 where the CPU multiplies it natively, else in
float32 (`CpuPlatform.auto_dtype`).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from platforms.interface import AttentionBackend, Platform


def has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16, or AMX tiles,
    which come with AMX-BF16); elsewhere oneDNN emulates it, slower than float32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


class CpuPlatform(Platform):
    name = "cpu"
    device = "cpu"
    dist_backend = "gloo"

    def is_available(self) -> bool:
        return True

    def auto_dtype(self, checkpoint_dtype: Optional[torch.dtype]) -> torch.dtype:
        """bfloat16 where the CPU computes it natively, float32 elsewhere.

        vLLM's CPU platform serves a float32 checkpoint in its first supported
        dtype, bfloat16; we do too, but only where bfloat16 is native, since
        emulated it is slower than float32. A float16 checkpoint follows the
        same rule: few CPUs multiply float16 fast.
        """
        return torch.bfloat16 if has_native_bf16() else torch.float32

    def fused_ops(self, dtype: torch.dtype):
        """The compiled ops (platforms/cpu/fused_ops.py) for bfloat16 models.

        Float32 models keep the plain layers, op for op as transformers runs
        them, so float32 outputs equal a float32 HF reference bit for bit;
        in bfloat16 the fused ops round where those layers do.
        """
        if dtype != torch.bfloat16:
            return None
        from platforms.cpu.fused_ops import cpu_fused_ops
        return cpu_fused_ops()

    def memory_info(self) -> tuple[int, int]:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        free = os.sysconf("SC_AVPHYS_PAGES") * page_size
        return pages * page_size, free

    def backend_names(self) -> list[str]:
        return ["fast", "reference"]

    def _make_backend(self, name: str) -> AttentionBackend:
        if name == "reference":
            from platforms.cpu.reference import ReferenceBackend
            return ReferenceBackend()
        from platforms.cpu.fast import FastCpuBackend
        return FastCpuBackend()
