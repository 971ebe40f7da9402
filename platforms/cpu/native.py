"""The CPU's compiled kernels, built on first use: decode attention and the
cache write (csrc/paged_decode.cpp, here) and the fused elementwise ops of
the model (csrc/fused_ops.cpp, platforms/cpu/fused_ops.py).

The sources have no torch headers, so g++ builds them in about two seconds
into `$XDG_CACHE_HOME/pagedllm/cpu-ext/<hash>/` (default `~/.cache/...`);
the hash covers the sources, the compiler and this CPU's model and flags
(`-march=native`), so a second start loads the cached library. It is called
through ctypes with the tensors' data pointers. Where no C++ compiler is
found (or the build fails) `library()` and `cpu_kernels()` return None, the
log says why once, and the callers keep their PyTorch paths.
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

CSRC = Path(__file__).resolve().parent / "csrc"
# Reassociation lets the dot products and sums vectorize; not -ffast-math,
# whose finite-math assumption would drop NaN checks and whose g++ 12 link
# step sets flush-to-zero for the whole process.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-fassociative-math",
         "-fno-signed-zeros", "-shared", "-fPIC", "-std=c++17")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}

_lock = threading.Lock()
_loaded: Optional[tuple[Optional[ctypes.CDLL]]] = None
_kernels: Optional["CpuKernels"] = None


class DecodeArgs(ctypes.Structure):
    """`DecodeArgs` of csrc/paged_decode.cpp, field for field."""

    _fields_ = ([(name, ctypes.c_void_p) for name in (
        "out", "query", "key_cache", "value_cache", "block_tables", "seq_ids", "seq_lens",
        "token_rows")]
        + [(name, ctypes.c_int64) for name in (
            "query_stride_token", "query_stride_head", "out_stride_token", "out_stride_head",
            "block_table_stride", "max_blocks", "num_blocks")]
        + [(name, ctypes.c_int) for name in (
            "num_seqs", "num_heads", "num_kv_heads", "head_size", "block_size")]
        + [("scale", ctypes.c_float)])


class WriteKvArgs(ctypes.Structure):
    """`WriteKvArgs` of csrc/paged_decode.cpp, field for field."""

    _fields_ = ([(name, ctypes.c_void_p) for name in (
        "key_cache", "value_cache", "key", "value", "slot_mapping")]
        + [(name, ctypes.c_int64) for name in (
            "key_stride_token", "key_stride_head", "value_stride_token", "value_stride_head",
            "num_slots")]
        + [(name, ctypes.c_int) for name in (
            "num_tokens", "num_kv_heads", "head_size", "element_size")])


class CpuKernels:
    """The loaded library: `decode(...)` and `write_kv(...)`."""

    def __init__(self, library: ctypes.CDLL):
        self.library = library
        if (library.pagedllm_cpu_args_size() != ctypes.sizeof(DecodeArgs)
                or library.pagedllm_cpu_write_kv_args_size() != ctypes.sizeof(WriteKvArgs)):
            raise OSError("argument structs differ between paged_decode.cpp and native.py")

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                 value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """The contract's `write_kv` for operands `can_write` accepts: `key/value
        [num_tokens, kv_heads, head]` (strided, contiguous last dim), caches NHD
        contiguous of the same dtype, `slot_mapping [num_tokens]` int64 contiguous."""
        args = WriteKvArgs(
            key_cache.data_ptr(), value_cache.data_ptr(), key.data_ptr(), value.data_ptr(),
            slot_mapping.data_ptr(), key.stride(0), key.stride(1), value.stride(0),
            value.stride(1), key_cache.shape[0] * key_cache.shape[1], key.shape[0],
            key.shape[1], key.shape[2], key.element_size())
        bad = self.library.pagedllm_cpu_write_kv(ctypes.byref(args))
        if bad >= 0:
            raise ValueError(f"slot_mapping[{bad}] = {int(slot_mapping[bad])} is outside the "
                             f"cache's {args.num_slots} slots (or -1 to skip)")

    @staticmethod
    def can_write(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                  value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
        """Whether these operands have the dtypes and layouts `write_kv` copies."""
        return (key.dtype == value.dtype == key_cache.dtype == value_cache.dtype
                and key.dim() == 3 and key.shape == value.shape
                and key.shape[1:] == key_cache.shape[2:]
                and key.stride(-1) == 1 and value.stride(-1) == 1
                and key_cache.is_contiguous() and value_cache.is_contiguous()
                and slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
                and slot_mapping.shape == key.shape[:1])

    def decode(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
               block_tables: torch.Tensor, seq_ids: torch.Tensor, seq_lens: torch.Tensor,
               token_rows: torch.Tensor, scale: float, out: torch.Tensor) -> None:
        """Attend `query[token_rows[i]]` over sequence `seq_ids[i]`'s first `seq_lens[i]`
        cached positions into `out[token_rows[i]]`.

        `query`, `out [T, heads, head]` (any strides but a contiguous last dim),
        caches `[num_blocks, block_size, kv_heads, head]` contiguous, in float32
        or bfloat16 (`can_decode`); `block_tables [seqs, max_blocks]` int32 with a
        contiguous last dim; `seq_ids`, `seq_lens`, `token_rows [n]` int64 contiguous.
        """
        num_blocks, block_size, num_kv_heads, head_size = key_cache.shape
        args = DecodeArgs(
            out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
            block_tables.data_ptr(), seq_ids.data_ptr(), seq_lens.data_ptr(),
            token_rows.data_ptr(), query.stride(0), query.stride(1), out.stride(0),
            out.stride(1), block_tables.stride(0), block_tables.shape[1], num_blocks,
            len(seq_ids), query.shape[1], num_kv_heads, head_size, block_size, scale)
        rc = self.library.pagedllm_cpu_decode(ctypes.byref(args), DTYPE_CODES[key_cache.dtype],
                                              torch.get_num_threads())
        if rc > 0:
            seq = int(seq_ids[rc - 1])
            raise ValueError(f"block_tables[{seq}] does not cover seq_len "
                             f"{int(seq_lens[rc - 1])} with blocks of the cache's {num_blocks}")
        if rc != 0:
            raise RuntimeError(f"paged_decode.cpp returned {rc}")

    @staticmethod
    def can_decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   block_tables: torch.Tensor) -> bool:
        """Whether these operands have the dtypes and layouts the kernel reads."""
        return (key_cache.dtype in DTYPE_CODES and query.dtype == key_cache.dtype
                and value_cache.dtype == key_cache.dtype and key_cache.is_contiguous()
                and value_cache.is_contiguous() and query.stride(-1) == 1
                and block_tables.dtype == torch.int32 and block_tables.stride(-1) == 1)


def find_compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp"))


def cpu_identity() -> bytes:
    """The CPU's model and feature flags: what `-march=native` compiles for."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return b""
    lines = cpuinfo.read_text().splitlines()
    return "\n".join(sorted({line for line in lines
                              if line.startswith(("model name", "flags"))})).encode()


def build_hash(compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    digest.update(version.encode())
    digest.update(cpu_identity())
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pagedllm" / "cpu-ext"


def build(compiler: str) -> Path:
    """Compile the kernels (or find them cached) -> the shared library's path."""
    target = cache_root() / build_hash(compiler) / "libpagedllm_cpu.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, *map(str, sources()), "-o", str(partial)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed:\n{result.stderr[-2000:]}")
        os.replace(partial, target)  # atomic: a concurrent start sees all or nothing
    return target


def library() -> Optional[ctypes.CDLL]:
    """The built library, or None (logged once) where it cannot be built here."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = (_load(),)
        return _loaded[0]


def cpu_kernels() -> Optional[CpuKernels]:
    """The attention kernels of `library()`, or None without it."""
    global _kernels
    lib = library()
    if lib is None:
        return None
    if _kernels is None or _kernels.library is not lib:
        _kernels = CpuKernels(lib)
    return _kernels


def _load() -> Optional[ctypes.CDLL]:
    compiler = find_compiler()
    if compiler is None:
        logger.warning("no C++ compiler (g++/c++, or $CXX) found: CPU decode attention, "
                       "cache writes and fused model ops run on the slower PyTorch paths")
        return None
    try:
        return ctypes.CDLL(str(build(compiler)))
    except OSError as error:
        logger.warning("CPU kernels not built, using the PyTorch paths: %s", error)
        return None
