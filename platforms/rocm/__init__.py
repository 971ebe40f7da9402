"""ROCm platform: AMD GPUs through a ROCm build of torch, attention in Triton.

torch exposes ROCm devices under the "cuda" device type and RCCL under the
"nccl" distributed backend name, so those are this platform's names too.
"""

from __future__ import annotations

import torch

from platforms.interface import AttentionBackend, Platform


class RocmPlatform(Platform):
    name = "rocm"
    device = "cuda"
    dist_backend = "nccl"

    def is_available(self) -> bool:
        return torch.version.hip is not None and torch.cuda.is_available()

    def unavailable_reason(self) -> str:
        if torch.version.hip is None:
            return (f"platform 'rocm' needs an AMD GPU and a ROCm build of torch; this torch "
                    f"({torch.__version__}) is not a ROCm build")
        return "platform 'rocm' needs an AMD GPU; torch (ROCm build) sees no AMD GPU device"

    def memory_info(self) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info()
        return total, free

    def backend_names(self) -> list[str]:
        return ["triton"]

    def _make_backend(self, name: str) -> AttentionBackend:
        from platforms.rocm.backend import TritonAttentionBackend
        return TritonAttentionBackend()
