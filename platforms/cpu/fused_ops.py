"""The model's fused elementwise ops on the CPU (csrc/fused_ops.cpp).

The same three ops, with the same signatures and rounding, as the Triton
kernels of engine/models/fused.py, which `engine.models.fused_forward` builds
a LLaMA forward pass from: one pass over the data each instead of 2-10
PyTorch ops, whose temporaries of a long prefill ([T, 2I] gate/up) spill
out of the caches. Layouts: rows strided, last dimension contiguous.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from platforms.cpu import native

_I64, _INT, _FLOAT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p


class CpuFusedOps:
    """`rms_norm`, `silu_and_mul`, `rotary_` for float32 and bfloat16 CPU tensors."""

    def __init__(self, library: ctypes.CDLL):
        self._lib = library
        library.pagedllm_cpu_rms_norm.argtypes = [_PTR, _PTR, _PTR, _PTR, _I64, _INT, _I64,
                                                  _I64, _FLOAT, _INT, _INT]
        library.pagedllm_cpu_silu_and_mul.argtypes = [_PTR, _PTR, _I64, _INT, _I64, _INT, _INT]
        library.pagedllm_cpu_rotary.argtypes = [_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _INT, _INT,
                                                _INT, _I64, _I64, _I64, _I64, _I64, _I64, _INT,
                                                _INT]

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`weight * x / rms(x)` over rows of `x [T, hidden]`; with `residual [T, hidden]`
        the norm is of `x + residual`, which is also stored into `residual`."""
        rows, hidden = x.shape
        out = torch.empty((rows, hidden), dtype=x.dtype)
        _check(x, weight, *(() if residual is None else (residual,)))
        self._lib.pagedllm_cpu_rms_norm(
            out.data_ptr(), x.data_ptr(), None if residual is None else residual.data_ptr(),
            weight.data_ptr(), rows, hidden, x.stride(0),
            0 if residual is None else residual.stride(0), eps, native.DTYPE_CODES[x.dtype],
            torch.get_num_threads())
        return out

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """`silu(gate) * up` for `gate_up [T, 2I]` = `[gate | up]` -> `[T, I]`."""
        rows, width = gate_up.shape
        out = torch.empty((rows, width // 2), dtype=gate_up.dtype)
        _check(gate_up)
        self._lib.pagedllm_cpu_silu_and_mul(
            out.data_ptr(), gate_up.data_ptr(), rows, width // 2, gate_up.stride(0),
            native.DTYPE_CODES[gate_up.dtype], torch.get_num_threads())
        return out

    def rotary_(self, query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate `query [T, H, D]` and `key [T, KVH, D]` in place by `cos/sin [max_pos, D]`
        rows at `positions [T]` (rotate-half, as `layers.apply_rotary`)."""
        tokens, heads, head_size = query.shape
        _check(query, key, cos, sin)
        positions = positions.to(torch.int64).contiguous()
        if cos.stride() != sin.stride() or cos.stride(-1) != 1:
            raise ValueError("cos and sin must be equally strided tables, rows contiguous")
        bad = self._lib.pagedllm_cpu_rotary(
            query.data_ptr(), key.data_ptr(), positions.data_ptr(), cos.data_ptr(),
            sin.data_ptr(), tokens, heads, key.shape[1], head_size, query.stride(0),
            query.stride(1), key.stride(0), key.stride(1), cos.stride(0), cos.shape[0],
            native.DTYPE_CODES[query.dtype], torch.get_num_threads())
        if bad > 0:
            raise ValueError(f"positions[{bad - 1}] = {int(positions[bad - 1])} is outside "
                             f"[0, {cos.shape[0]}), the rotary table's rows")


def _check(*tensors: torch.Tensor) -> None:
    dtype = tensors[0].dtype
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != dtype or dtype not in native.DTYPE_CODES:
            raise ValueError(f"CPU fused ops take float32 or bfloat16 CPU tensors of one "
                             f"dtype, got {t.dtype} on {t.device}")
        if t.stride(-1) != 1:
            raise ValueError("CPU fused ops need a contiguous last dimension")


def cpu_fused_ops() -> Optional[CpuFusedOps]:
    """The ops of the built library, or None where it cannot be built here."""
    library = native.library()
    return None if library is None else CpuFusedOps(library)
