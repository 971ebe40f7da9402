"""Fused Triton kernels for the LLaMA family's elementwise work, and the forward pass using them.

The plain layers (engine.models.layers, llama.py) launch 5-10 small kernels
for each RMSNorm, rotary embedding and SiLU gate; at decode batch sizes
each of those is a few microseconds of launch and memory traffic, 16 layers
deep. Here each is one kernel:

- `rms_norm(x, weight, eps, residual=None)`: with `residual`, first
  `residual <- x + residual` (in place), then the norm of the new residual;
- `silu_and_mul(gate_up [T, 2I]) -> [T, I]`;
- `rotary_(q [T, H, D], k [T, KVH, D], positions [T], cos, sin)`: rotate-half
  rotary embedding, in place (q and k may be strided views of the packed qkv).

Every kernel rounds to the model dtype exactly where the plain PyTorch code
does (the add, the normalized value before the weight, the SiLU before the
product, each product of the rotary), so in float32 both paths agree to
rounding and in bfloat16 they differ only in reduction order.

`engine.models.fused_forward` builds `LlamaForCausalLM.forward` from these
three (this module is its `ops` on GPUs; platforms/cpu/fused_ops.py gives
the CPU's).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_r, stride_o,
                     eps, HIDDEN: tl.constexpr, BLOCK: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        summed = (x + residual.to(tl.float32)).to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * stride_r + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / HIDDEN + eps)
    normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (weight * normed).to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, INTER: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + INTER + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (silu * up).to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _rotate_heads(x_ptr, stride_h, cos, sin, NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Rotate the NUM_HEADS head vectors at x_ptr (one token) in place."""
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HALF_PAD)
    mask = (heads < NUM_HEADS)[:, None] & (dims < HALF)[None, :]
    first = x_ptr + heads[:, None] * stride_h + dims[None, :]
    dtype = x_ptr.dtype.element_ty
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, each product rounded as the plain path does
    out1 = (x1 * cos).to(dtype).to(tl.float32) + (-x2 * sin).to(dtype).to(tl.float32)
    out2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    tl.store(first, out1.to(dtype), mask=mask)
    tl.store(first + HALF, out2.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh,
                   stride_kt, stride_kh, stride_cos, NUM_HEADS: tl.constexpr,
                   NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                   KV_HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    # cos/sin rows are cat(f, f): the first half serves both halves of a head.
    cos = tl.load(cos_ptr + position * stride_cos + dims, mask=dims < HALF, other=0.0)
    sin = tl.load(sin_ptr + position * stride_cos + dims, mask=dims < HALF, other=0.0)
    cos = cos.to(tl.float32)[None, :]
    sin = sin.to(tl.float32)[None, :]
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, cos, sin, NUM_HEADS, HEADS_PAD,
                  HALF, HALF_PAD)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, cos, sin, NUM_KV_HEADS, KV_HEADS_PAD,
                  HALF, HALF_PAD)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`weight * x / rms(x)` over rows of `x [T, hidden]`; with `residual [T, hidden]`
    the norm is of `x + residual`, which is also stored into `residual`."""
    num_tokens, hidden = x.shape
    out = torch.empty_like(x)
    if num_tokens == 0:
        return out
    has_residual = residual is not None
    residual = residual if has_residual else x
    _rms_norm_kernel[(num_tokens,)](
        x, residual, weight, out, x.stride(0), residual.stride(0), out.stride(0), eps,
        HIDDEN=hidden, BLOCK=triton.next_power_of_2(hidden), HAS_RESIDUAL=has_residual)
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `gate_up [T, 2I]` = `[gate | up]` -> `[T, I]`."""
    num_tokens, width = gate_up.shape
    inter = width // 2
    out = torch.empty((num_tokens, inter), dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), INTER=inter, BLOCK=block)
    return out


def rotary_(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
            cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate `query [T, H, D]` and `key [T, KVH, D]` in place by `cos/sin [max_pos, D]`
    rows at `positions [T]` (rotate-half, as `layers.apply_rotary`)."""
    num_tokens, num_heads, head_size = query.shape
    if num_tokens == 0:
        return
    half = head_size // 2
    _rotary_kernel[(num_tokens,)](
        query, key, positions, cos, sin, query.stride(0), query.stride(1), key.stride(0),
        key.stride(1), cos.stride(0), NUM_HEADS=num_heads, NUM_KV_HEADS=key.shape[1],
        HEADS_PAD=triton.next_power_of_2(num_heads),
        KV_HEADS_PAD=triton.next_power_of_2(key.shape[1]), HALF=half,
        HALF_PAD=triton.next_power_of_2(half))
