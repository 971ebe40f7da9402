"""Intel XPU platform: IPEX and OpenVINO PagedAttention backends.

Neither vendor stack is imported here: a backend imports its library on
first use (`require`), so the platform loads, and its backends can be built
and tested, on a machine with no Intel GPU and without the other stack.
Both backends also run on CPU tensors, which is how they are checked where
no Intel GPU is present.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from platforms.interface import AttentionBackend, Platform


def require(module: str, install_hint: str) -> ModuleType:
    """Import a vendor module, or fail saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"the xpu platform needs {module!r} ({install_hint}): {error}") from error


class XpuPlatform(Platform):
    name = "xpu"
    device = "xpu"
    dist_backend = "xccl"

    def is_available(self) -> bool:
        return hasattr(torch, "xpu") and torch.xpu.is_available()

    def unavailable_reason(self) -> str:
        if not hasattr(torch, "xpu"):
            return f"no Intel GPU: torch {torch.__version__} is built without XPU support"
        return "no Intel GPU (XPU) found: torch.xpu.is_available() is False"

    def memory_info(self) -> tuple[int, int]:
        if not self.is_available():
            raise RuntimeError(self.unavailable_reason())
        free, total = torch.xpu.mem_get_info()
        return total, free

    def backend_names(self) -> list[str]:
        return ["ipex", "openvino"]

    def _make_backend(self, name: str) -> AttentionBackend:
        if name == "ipex":
            from platforms.xpu.ipex_backend import IpexBackend
            return IpexBackend()
        from platforms.xpu.openvino_backend import OpenVinoBackend
        return OpenVinoBackend()
