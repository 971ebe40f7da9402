"""CPU platform: the reference oracle and a fast vectorized backend."""

from __future__ import annotations

import os

import torch

from platforms.interface import AttentionBackend, Platform


class CpuPlatform(Platform):
    name = "cpu"
    device = "cpu"
    dist_backend = "gloo"

    def is_available(self) -> bool:
        return True

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
