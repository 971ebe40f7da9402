"""The CPU's compiled decode kernel (csrc/paged_decode.cpp), built on first use.

The source has no torch headers, so g++ builds it in about a second into
`$XDG_CACHE_HOME/pagedllm/cpu-ext/<hash>/` (default `~/.cache/...`); the
hash covers the source, the compiler and this CPU's `-march=native`
target, so a second start loads the cached library. It is called through
ctypes with the tensors' data pointers. Where no C++ compiler is found (or
the build fails) `decode_kernel()` returns None, says why once in the log,
and the fast backend keeps its PyTorch decode path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "paged_decode.cpp"
# Reassociation lets the dot products and sums vectorize; not -ffast-math,
# whose finite-math assumption would drop NaN checks and whose g++ 12 link
# step sets flush-to-zero for the whole process.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-fassociative-math",
         "-fno-signed-zeros", "-shared", "-fPIC", "-std=c++17")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}

_lock = threading.Lock()
_loaded: Optional[tuple[Optional["DecodeKernel"]]] = None


class DecodeArgs(ctypes.Structure):
    """`DecodeArgs` of csrc/paged_decode.cpp, field for field."""

    _fields_ = ([(name, ctypes.c_void_p) for name in (
        "out", "query", "key_cache", "value_cache", "block_tables", "seq_ids", "seq_lens",
        "token_rows")]
        + [(name, ctypes.c_int64) for name in (
            "query_stride_token", "query_stride_head", "out_stride_token", "out_stride_head",
            "block_table_stride")]
        + [(name, ctypes.c_int) for name in (
            "num_seqs", "num_heads", "num_kv_heads", "head_size", "block_size")]
        + [("scale", ctypes.c_float)])


class DecodeKernel:
    """The loaded library: `decode(...)` runs one batch of decode tokens."""

    def __init__(self, library: ctypes.CDLL):
        self._lib = library
        if library.pagedllm_cpu_args_size() != ctypes.sizeof(DecodeArgs):
            raise OSError("DecodeArgs differs between paged_decode.cpp and native.py")

    def decode(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
               block_tables: torch.Tensor, seq_ids: torch.Tensor, seq_lens: torch.Tensor,
               token_rows: torch.Tensor, scale: float, out: torch.Tensor) -> None:
        """Attend `query[token_rows[i]]` over sequence `seq_ids[i]`'s first `seq_lens[i]`
        cached positions into `out[token_rows[i]]`.

        `query`, `out [T, heads, head]` (any strides but a contiguous last dim),
        caches `[num_blocks, block_size, kv_heads, head]` contiguous, in float32
        or bfloat16 (`supports`); `block_tables [seqs, max_blocks]` int32 with a
        contiguous last dim; `seq_ids`, `seq_lens`, `token_rows [n]` int64 contiguous.
        """
        num_blocks, block_size, num_kv_heads, head_size = key_cache.shape
        args = DecodeArgs(
            out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
            block_tables.data_ptr(), seq_ids.data_ptr(), seq_lens.data_ptr(),
            token_rows.data_ptr(), query.stride(0), query.stride(1), out.stride(0),
            out.stride(1), block_tables.stride(0), len(seq_ids), query.shape[1], num_kv_heads,
            head_size, block_size, scale)
        rc = self._lib.pagedllm_cpu_decode(ctypes.byref(args), DTYPE_CODES[key_cache.dtype],
                                           torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"paged_decode.cpp returned {rc}")

    @staticmethod
    def supports(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_tables: torch.Tensor) -> bool:
        """Whether these operands have the dtypes and layouts the kernel reads."""
        return (key_cache.dtype in DTYPE_CODES and query.dtype == key_cache.dtype
                and value_cache.dtype == key_cache.dtype and key_cache.is_contiguous()
                and value_cache.is_contiguous() and query.stride(-1) == 1
                and block_tables.dtype == torch.int32 and block_tables.stride(-1) == 1)


def find_compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build_hash(compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    digest.update(version.encode())
    digest.update(Path("/proc/cpuinfo").read_bytes() if Path("/proc/cpuinfo").exists() else b"")
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pagedllm" / "cpu-ext"


def build(compiler: str) -> Path:
    """Compile the kernel (or find it cached) -> the shared library's path."""
    target = cache_root() / build_hash(compiler) / "libpagedllm_cpu.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed:\n{result.stderr[-2000:]}")
        os.replace(partial, target)  # atomic: a concurrent start sees all or nothing
    return target


def decode_kernel() -> Optional[DecodeKernel]:
    """The built kernel, or None (logged once) where it cannot be built here."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = (_load(),)
        return _loaded[0]


def _load() -> Optional[DecodeKernel]:
    compiler = find_compiler()
    if compiler is None:
        logger.warning("no C++ compiler (g++/c++, or $CXX) found: CPU decode attention "
                       "runs on the slower PyTorch path")
        return None
    try:
        return DecodeKernel(ctypes.CDLL(str(build(compiler))))
    except OSError as error:
        logger.warning("CPU decode kernel not built, using the PyTorch path: %s", error)
        return None
