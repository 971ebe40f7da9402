"""Reshape-and-cache in Triton: scatter new tokens' K/V into the paged NHD cache.

Layouts: `key / value [num_tokens, num_kv_heads, head_size]`;
`key_cache / value_cache [num_blocks, block_size, num_kv_heads, head_size]`;
`slot_mapping [num_tokens]` int64, slot = block * block_size + offset, -1 = skip.
One program per (token, kv head) copies one head vector of K and of V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def write_kv_kernel(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
                    stride_k_t, stride_k_h, stride_v_t, stride_v_h,
                    stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
                    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    dims = tl.arange(0, HEAD_PAD)
    dim_valid = dims < HEAD_SIZE
    k = tl.load(key_ptr + token * stride_k_t + kv_head * stride_k_h + dims, mask=dim_valid)
    v = tl.load(value_ptr + token * stride_v_t + kv_head * stride_v_h + dims, mask=dim_valid)
    k_dst = key_cache_ptr + block * stride_kc_b + offset * stride_kc_s + kv_head * stride_kc_h
    v_dst = value_cache_ptr + block * stride_vc_b + offset * stride_vc_s + kv_head * stride_vc_h
    tl.store(k_dst + dims, k.to(key_cache_ptr.dtype.element_ty), mask=dim_valid)
    tl.store(v_dst + dims, v.to(value_cache_ptr.dtype.element_ty), mask=dim_valid)


def write_kv_constexprs(head_size: int, block_size: int) -> dict:
    """The compile-time arguments of `write_kv_kernel`."""
    return dict(HEAD_SIZE=head_size, HEAD_PAD=triton.next_power_of_2(head_size),
                BLOCK_SIZE=block_size)


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store `key/value` at `slot_mapping` in the caches (in place)."""
    num_tokens, num_kv_heads, head_size = key.shape
    if num_tokens == 0:
        return
    write_kv_kernel[(num_tokens, num_kv_heads)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        *key_cache.stride()[:3], *value_cache.stride()[:3],
        **write_kv_constexprs(head_size, key_cache.shape[1]))
