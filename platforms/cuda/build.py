"""JIT build of the PagedAttention CUDA extension (platforms/cuda/csrc).

Built on first kernel call with `torch.utils.cpp_extension.load` for the
current GPU's architecture only, into
`$XDG_CACHE_HOME/pagedllm/cuda-ext/<hash>` (default `~/.cache/...`). The hash
covers the sources, the torch/CUDA versions and the target architecture, so a
second start imports the cached library without compiling, and any source
change builds into a fresh directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
# Compiled translation units; headers (*.h, *.cuh) enter the hash only.
SOURCES = ("binding.cpp", "write_kv.cu", "dispatch.cu", "attention_fp16.cu",
           "attention_bf16.cu", "attention_fp32.cu")

_lock = threading.Lock()
_extension: Optional[ModuleType] = None


class CudaBuildError(RuntimeError):
    """The CUDA extension cannot be built here (no nvcc, CPU-only torch, ...)."""


def arch_flag(capability: tuple[int, int]) -> str:
    """nvcc target for one compute capability, e.g. (9, 0) -> sm_90."""
    arch = f"{capability[0]}{capability[1]}"
    return f"-gencode=arch=compute_{arch},code=sm_{arch}"


def source_files() -> list[Path]:
    """Every file of csrc/ that can change the build (sources and headers)."""
    return sorted(p for p in CSRC.iterdir() if p.suffix in {".cu", ".cuh", ".cpp", ".h"})


def build_hash(capability: tuple[int, int]) -> str:
    digest = hashlib.sha256()
    for path in source_files():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{arch_flag(capability)}".encode())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pagedllm" / "cuda-ext"


def find_nvcc() -> Optional[str]:
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def check_toolchain() -> None:
    """Raise CudaBuildError saying what is missing to build the extension."""
    if not torch.version.cuda:
        raise CudaBuildError(
            f"torch {torch.__version__} is a CPU-only build; the CUDA kernels need a CUDA "
            "build of torch (pip install torch from the CUDA index)")
    if not torch.cuda.is_available():
        raise CudaBuildError("no NVIDIA GPU is visible to torch (torch.cuda.is_available() "
                             "is False); the CUDA kernels are built for the GPU present")
    if find_nvcc() is None:
        raise CudaBuildError("nvcc (the CUDA compiler) was not found: install the CUDA "
                             "toolkit and put its bin/ on PATH or set CUDA_HOME")


def load_extension() -> ModuleType:
    """The compiled extension, building it on first use (thread-safe)."""
    global _extension
    if _extension is not None:
        return _extension
    with _lock:
        if _extension is None:
            _extension = _build()
    return _extension


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load
    check_toolchain()
    capability = torch.cuda.get_device_capability()
    digest = build_hash(capability)
    build_dir = cache_root() / digest
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return load(
            name=f"pagedllm_cuda_{digest}",
            sources=[str(CSRC / name) for name in SOURCES],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", arch_flag(capability)],
            build_directory=str(build_dir),
            verbose=False,
        )
    except (RuntimeError, OSError) as err:
        raise CudaBuildError(f"building the CUDA extension in {build_dir} failed: {err}") from err
